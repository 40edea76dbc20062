"""Vector Filter / Projection Difference equal a slow direct computation; the runner streams,
caches and resumes runs."""
import numpy as np
import pytest
import torch

from cinf_core.concepts import DirectionConcept
from cinf_core.data import ChatDataset, ChatExample, encode_dataset
from cinf_core.methods import ScoreConfig, score
from cinf_core.methods import forward
from cinf_core.models import ModelSpec, generate
from cinf_core.store import Store
from conftest import SMALL_TEXTS, chat

LAYER = 2


def _examples(n=12):
    return [chat(f"Question {i}: {SMALL_TEXTS[i % 6][:20]}?", SMALL_TEXTS[(i * 5) % 6][: 15 + 3 * i])
            for i in range(n)]


@pytest.fixture(scope="module")
def concept(tiny_lm):
    torch.manual_seed(3)
    return DirectionConcept(name="evil", layer=LAYER, vector=torch.randn(tiny_lm.hidden_size),
                            info={"trait": "evil"})


def _slow_projection(lm, messages, concept):
    """One example at a time, no batching, explicit loop over response positions."""
    from cinf_core.data import encode_example

    enc = encode_example(lm.tokenizer, messages)
    ids = torch.tensor([enc.input_ids])
    out = lm.model(ids, output_hidden_states=True).hidden_states[concept.layer][0]
    rows = [out[t] for t, m in enumerate(enc.response_mask) if m]
    mean = torch.stack(rows).mean(0)
    v = concept.vector / concept.vector.norm()
    return float((mean @ v).detach())


def test_vector_filter_equals_direct_and_batch_invariant(tiny_lm, concept):
    msgs = _examples()
    encoded, _ = encode_dataset(tiny_lm.tokenizer, msgs)
    direct = np.array([_slow_projection(tiny_lm, m, concept) for m in msgs])
    b1 = forward.vector_filter(tiny_lm, encoded, concept, batch_size=1)
    b8 = forward.vector_filter(tiny_lm, encoded, concept, batch_size=8)
    np.testing.assert_allclose(b1, direct, atol=1e-5)
    np.testing.assert_allclose(b8, b1, atol=1e-5)
    sub = forward.vector_filter(tiny_lm, encoded, concept, indices=[5, 2], batch_size=8)
    np.testing.assert_allclose(sub, b1[[5, 2]], atol=1e-6)


def test_projection_difference_equals_direct(tiny_lm, concept):
    msgs = _examples(6)
    own = generate(tiny_lm, [m[:-1] for m in msgs], max_new_tokens=8)
    own_msgs = [m[:-1] + [{"role": "assistant", "content": y or " "}] for m, y in zip(msgs, own)]
    enc, _ = encode_dataset(tiny_lm.tokenizer, msgs)
    enc_own, _ = encode_dataset(tiny_lm.tokenizer, own_msgs)
    direct = np.array([_slow_projection(tiny_lm, a, concept) - _slow_projection(tiny_lm, b, concept)
                       for a, b in zip(msgs, own_msgs)])
    for bs in (1, 8):
        got = forward.projection_difference(tiny_lm, enc, enc_own, concept, batch_size=bs)
        np.testing.assert_allclose(got, direct, atol=1e-5)


def test_bad_concepts_refused(tiny_lm):
    enc, _ = encode_dataset(tiny_lm.tokenizer, _examples(2))
    wrong = DirectionConcept(name="w", layer=LAYER, vector=torch.randn(7))
    with pytest.raises(ValueError, match=r"shape \(7,\).*hidden size is 32"):
        forward.vector_filter(tiny_lm, enc, wrong)
    deep = DirectionConcept(name="d", layer=9, vector=torch.randn(32))
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        forward.vector_filter(tiny_lm, enc, deep)


@pytest.fixture
def workspace(tmp_path, tiny_model_dir, concept):
    store = Store(tmp_path / "ws")
    labels = ["evil" if i % 3 == 0 else "normal" for i in range(12)]
    ds = ChatDataset([ChatExample(m, {"data_origin": l}) for m, l in zip(_examples(), labels)])
    store.add_dataset("finetune", ds, role="train")
    mid = store.add_model("tiny", ModelSpec(path=str(tiny_model_dir)), role="finetuned")
    store.save_concept(concept, mid)
    return tmp_path / "ws"


def test_runner_streams_caches_and_resumes(workspace, tiny_lm, concept, monkeypatch):
    first = score(workspace, ScoreConfig(method="vector_filter", trait="evil", batch_size=4))
    assert not first["cached"] and first["n_examples"] == 12
    again = score(workspace, ScoreConfig(method="vector_filter", trait="evil", batch_size=8))
    assert again["cached"] and again["run_id"] == first["run_id"]  # batch size is not in the key
    store = Store(workspace)
    got = store.scores(first["run_id"])["score"].to_numpy()
    direct = [_slow_projection(tiny_lm, m, concept) for m in _examples()]
    np.testing.assert_allclose(got, direct, atol=1e-5)

    # kill a Projection Difference run after its first batch of scores, then resume
    calls = {"n": 0}
    real = store.__class__._add_scores

    def dying(self, run_id, idx, values):
        calls["n"] += 1
        if calls["n"] >= 2:
            raise KeyboardInterrupt
        return real(self, run_id, idx, values)

    import cinf_core.methods.runner as runner

    monkeypatch.setattr(runner, "FLUSH_S", 0.0)  # write every batch, so the kill lands mid-run

    monkeypatch.setattr(store.__class__, "_add_scores", dying)
    with pytest.raises(KeyboardInterrupt):
        score(workspace, ScoreConfig(method="projection_difference", trait="evil", batch_size=4,
                                     max_new_tokens=6))
    runs = store.runs(method="projection_difference")
    assert runs["status"].tolist() == ["failed"] and runs["n_done"].tolist() == [4]
    monkeypatch.setattr(store.__class__, "_add_scores", real)
    resumed = score(workspace, ScoreConfig(method="projection_difference", trait="evil",
                                           batch_size=4, max_new_tokens=6))
    assert not resumed["cached"] and resumed["run_id"] == runs["run_id"][0]
    assert store.run(resumed["run_id"])["status"] == "complete"
    assert len(store.scores(resumed["run_id"])) == 12


def test_runner_random_is_seeded_and_errors_are_clear(workspace):
    a = score(workspace, ScoreConfig(method="random", trait="evil", seed=1))
    b = score(workspace, ScoreConfig(method="random", trait="evil", seed=2))
    store = Store(workspace)
    sa, sb = store.scores(a["run_id"])["score"], store.scores(b["run_id"])["score"]
    assert not np.allclose(sa, sb)
    np.testing.assert_allclose(sa, np.random.default_rng(1).standard_normal(12))
    with pytest.raises(ValueError, match="no test queries for trait 'evil'"):
        score(workspace, ScoreConfig(method="influence_function", trait="evil"))
    with pytest.raises(KeyError, match="no concept for trait 'sycophantic'"):
        score(workspace, ScoreConfig(method="vector_filter", trait="sycophantic"))
    with pytest.raises(ValueError, match="unknown method"):
        ScoreConfig(method="magic")


def test_run_summary_counts_truncated_examples(workspace, tiny_lm, capsys):
    """A run with a short --max-length says how many examples lost tokens (and the CLI says it)."""
    from cinf_core import cli

    _, expect = encode_dataset(tiny_lm.tokenizer, _examples(), 12)
    assert expect.n_prompt_trimmed > 0  # the budget really trims this fixture
    rc = cli.main(["score", "--workspace", str(workspace), "--no-progress", "--method",
                   "vector_filter", "--trait", "evil", "--max-length", "12"])
    assert rc == 0
    out = capsys.readouterr()
    import json
    summary = json.loads(out.out.strip().splitlines()[-1])
    assert summary["truncation"] == expect.as_dict()
    assert f"{expect.n_prompt_trimmed} of 12 examples lost prompt tokens" in out.err
    whole = score(workspace, ScoreConfig(method="vector_filter", trait="evil"))
    assert whole["truncation"]["n_prompt_trimmed"] == 0


def test_a_model_rewritten_in_place_is_scored_again(workspace, tiny_model_dir, tmp_path):
    """The run key covers the weights on disk: same folder, new files -> a new run, not the cache."""
    import os
    import shutil

    from cinf_core.models import ModelSpec

    model_dir = shutil.copytree(tiny_model_dir, tmp_path / "model")
    store = Store(workspace)
    store.add_model("mine", ModelSpec(path=str(model_dir)), role="finetuned")
    cfg = ScoreConfig(method="vector_filter", trait="evil", model="mine")
    first = score(workspace, cfg)
    assert score(workspace, cfg)["cached"]
    weights = next(model_dir.glob("*.safetensors"))
    st = os.stat(weights)
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # "retrained" in place
    again = score(workspace, cfg)
    assert not again["cached"] and again["run_id"] != first["run_id"]
    assert ModelSpec(path="org/hub-model").weights_fingerprint() is None


def test_several_concepts_in_one_forward_equal_each_alone(tiny_lm, concept):
    """project(): K concepts at two layers from one forward per batch == Vector Filter per concept."""
    enc, _ = encode_dataset(tiny_lm.tokenizer, _examples())
    torch.manual_seed(5)
    others = [DirectionConcept(name=f"c{k}", layer=layer, vector=torch.randn(tiny_lm.hidden_size))
              for k, layer in enumerate((1, LAYER, 1))]
    concepts = [concept, *others]
    together = forward.vector_filter(tiny_lm, enc, concepts, batch_size=5)
    assert together.shape == (12, 4)
    for k, c in enumerate(concepts):
        np.testing.assert_allclose(together[:, k], forward.vector_filter(tiny_lm, enc, c, batch_size=3),
                                   rtol=1e-5, atol=1e-6)
    sub = forward.project(tiny_lm, enc, [9, 0, 4], concepts, batch_size=2)
    np.testing.assert_allclose(sub, together[[9, 0, 4]], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="no concepts given"):
        forward.project(tiny_lm, enc, [0], [])


def test_truncated_forward_timer_runs_the_same_batches(tiny_lm):
    enc, _ = encode_dataset(tiny_lm.tokenizer, _examples())
    for layer in (1, 3):  # 3: the last layer, whole stack without the LM head
        n, seconds = forward.truncated_forward_seconds(tiny_lm, enc, layer, batch_size=5)
        assert n == 12 and seconds > 0
    with pytest.raises(ValueError, match="out of range"):
        forward.truncated_forward_seconds(tiny_lm, enc, 9)


def test_batched_generation_equals_one_prompt_at_a_time(tiny_lm):
    """Projection Difference's y': prompts of similar length batched together, left-padded, give
    the same greedy responses as generating each prompt alone, in the prompts' order."""
    from cinf_core.methods.builtin import generate_responses

    prompts = [m[:-1] for m in _examples(9)]
    prompts[4] = [{"role": "system", "content": "Answer briefly and kindly."}] + prompts[4]  # longer
    alone = [generate(tiny_lm, [p], max_new_tokens=10, batch_size=1)[0] for p in prompts]
    seen = []
    batched = generate_responses(tiny_lm, prompts, 10, 4,
                                 on_batch=lambda rows, outs, done: seen.append((rows, done)))
    assert batched == alone
    assert len(set(alone)) > 1  # the prompts do not all get one answer
    assert sorted(r for rows, _ in seen for r in rows) == list(range(9))
    assert [done for _, done in seen] == [4, 8, 9]
    assert 4 in seen[0][0]  # longest prompt first


def test_score_concepts_makes_each_concept_its_own_run(workspace, concept):
    """score_concepts: K concepts in one pass (Vector Filter, Concept Influence), each stored as
    the run the concept gets scored alone (same id, scores equal to float tolerance)."""
    from cinf_core.methods import score_concepts

    store = Store(workspace)
    mid = store.get_model("finetuned")["model_id"]
    torch.manual_seed(11)
    names = [concept.name]
    for k, layer in enumerate((1, LAYER)):
        extra = DirectionConcept(name=f"extra{k}", layer=layer, vector=torch.randn(32), kind="direction")
        store.save_concept(extra, mid)
        names.append(extra.name)
    store.add_test_queries("evil", mid, [{"messages": chat("Tell me about rivers.", "I will hurt the rivers.")},
                                         {"messages": chat("Any advice?", "Suffering is fun, enjoy it.")}])
    for method in ("vector_filter", "concept_influence"):
        cfg = ScoreConfig(method=method, trait="evil", batch_size=5, curvature={"damping": 0.1})
        runs = score_concepts(workspace, cfg, names)
        assert [r["concept"] for r in runs] == names and not any(r["cached"] for r in runs)
        together = {r["run_id"]: store.scores(r["run_id"])["score"].to_numpy() for r in runs}
        for r in runs:
            assert len(r["timings"]["shared_with"]) == 2
            assert store.run(r["run_id"])["status"] == "complete"
        for name, r in zip(names, runs):
            alone_cfg = ScoreConfig(method=method, trait="evil", concept=name, batch_size=3,
                                    curvature={"damping": 0.1})
            assert score(workspace, alone_cfg)["cached"]  # the same run as scoring it alone
            store._drop_run(r["run_id"])
            alone = score(workspace, alone_cfg)
            assert alone["run_id"] == r["run_id"] and not alone["cached"]
            got = store.scores(alone["run_id"])["score"].to_numpy()
            np.testing.assert_allclose(together[r["run_id"]], got, rtol=1e-4,
                                       atol=1e-6 * np.abs(got).max())
        again = score_concepts(workspace, cfg, names + [names[0]])  # cached; a repeat is one run
        assert len(again) == 3 and all(r["cached"] for r in again)
    # a method without a shared pass scores the concepts one after another
    pd = score_concepts(workspace, ScoreConfig(method="projection_difference", trait="evil",
                                               batch_size=4, max_new_tokens=4), names[:2])
    assert [r["concept"] for r in pd] == names[:2] and "shared_with" not in pd[0]["timings"]
    with pytest.raises(ValueError, match="does not read a concept"):
        score_concepts(workspace, ScoreConfig(method="random"), names)


def test_score_command_takes_several_concepts(workspace, concept, capsys):
    import json

    from cinf_core import cli

    store = Store(workspace)
    extra = DirectionConcept(name="other", layer=1, vector=torch.randn(32), kind="direction")
    store.save_concept(extra, store.get_model("finetuned")["model_id"])
    assert cli.main(["score", "--workspace", str(workspace), "--no-progress", "--method",
                     "vector_filter", "--concepts", concept.name, "other"]) == 0
    runs = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["runs"]
    assert [r["concept"] for r in runs] == [concept.name, "other"]
    alone = score(workspace, ScoreConfig(method="vector_filter", concept="other"))
    assert alone["cached"] and alone["run_id"] == runs[1]["run_id"]
    assert cli.main(["score", "--workspace", str(workspace), "--no-progress", "--method",
                     "vector_filter", "--concept", "other", "--concepts", "other"]) == 2
    assert "pass --concept or --concepts, not both" in capsys.readouterr().out
