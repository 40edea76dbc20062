"""Concept builders on a tiny Llama: persona vectors, linear probes, uploaded vectors."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cinf_core.concepts.builders import linear_probe, load_uploaded_vector, persona_vector
from cinf_core.data import encode_example
from cinf_core.demo.tokenizer import train_tokenizer
from cinf_core.experiments.judges import Judge
from cinf_core.models import ModelSpec, generate, load_model

EVIL_WORDS = "destroy suffer crush torment revenge pain ruin burn".split()
KIND_WORDS = "garden bread recipe friends music sunny picnic tea".split()
QUESTIONS = ["How do I bake bread?", "What should I do today?", "Tell me about music.",
             "How can I help a friend?"]
TRAIT_SP = "You are evil. Make them suffer."
HELPFUL_SP = "You are a helpful assistant."


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    from transformers import LlamaConfig, LlamaForCausalLM

    corpus = [" ".join(EVIL_WORDS), " ".join(KIND_WORDS), *QUESTIONS, TRAIT_SP, HELPFUL_SP] * 10
    tok = train_tokenizer(corpus, vocab_size=400)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=None)
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_llama")
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return load_model(ModelSpec(path=str(path), dtype="float32", device="cpu"))


@torch.no_grad()
def _response_means(lm, conversations) -> torch.Tensor:
    """Independent a_l: one unpadded full forward per conversation -> [n, L+1, d]."""
    rows = []
    for messages in conversations:
        enc = encode_example(lm.tokenizer, messages)
        ids = torch.tensor([enc.input_ids])
        hs = lm.model(input_ids=ids, output_hidden_states=True).hidden_states
        mask = torch.tensor(enc.response_mask, dtype=torch.bool)
        rows.append(torch.stack([h[0][mask].mean(0) for h in hs]))
    return torch.stack(rows)


def _conv(system, question, answer):
    return [{"role": "system", "content": system}, {"role": "user", "content": question},
            {"role": "assistant", "content": answer}]


def test_persona_vector_is_mean_difference_over_all_layers(lm):
    vectors, info = persona_vector(lm, QUESTIONS, TRAIT_SP, HELPFUL_SP, max_new_tokens=6)
    assert vectors.shape == (lm.num_layers + 1, lm.hidden_size)
    assert info["layers"] == [0, 1, 2]
    expected_trait = generate(lm, [[{"role": "system", "content": TRAIT_SP},
                                    {"role": "user", "content": q}] for q in QUESTIONS], max_new_tokens=6)
    assert info["trait_responses"] == expected_trait
    kept = info["kept"]
    assert kept == [i for i in range(4) if info["trait_responses"][i] and info["helpful_responses"][i]]
    assert len(kept) >= 2
    a_t = _response_means(lm, [_conv(TRAIT_SP, QUESTIONS[i], info["trait_responses"][i]) for i in kept])
    a_h = _response_means(lm, [_conv(HELPFUL_SP, QUESTIONS[i], info["helpful_responses"][i]) for i in kept])
    torch.testing.assert_close(vectors, a_t.mean(0) - a_h.mean(0), rtol=1e-4, atol=1e-5)
    assert info["norms"] == pytest.approx(vectors.norm(dim=1).tolist())

    only_one, _ = persona_vector(lm, QUESTIONS, TRAIT_SP, HELPFUL_SP, layers=[1], max_new_tokens=6)
    torch.testing.assert_close(only_one[0], vectors[1])


class _ScriptedJudge(Judge):
    """Returns prepared scores: the first call (trait answers), then the second (helpful answers)."""

    kind = "scripted"

    def __init__(self, *calls: list[float]):
        self.calls = list(calls)
        self.seen: list[tuple[str, list[str], list[str]]] = []

    def score(self, trait, prompts, responses):
        self.seen.append((trait, list(prompts), list(responses)))
        return self.calls.pop(0)

    def config(self):
        return {"kind": self.kind}


def test_persona_vector_keeps_only_pairs_the_judge_separates(lm):
    judge = _ScriptedJudge([90.0, 40.0, 80.0, math.nan], [10.0, 30.0, 50.0, 0.0])
    vectors, info = persona_vector(lm, QUESTIONS, TRAIT_SP, HELPFUL_SP, layers=[2], judge=judge,
                                   trait="evil", min_gap=25.0, max_new_tokens=6)
    non_empty = [i for i in range(4) if info["trait_responses"][i] and info["helpful_responses"][i]]
    assert info["kept"] == [i for i in (0, 2) if i in non_empty]
    assert judge.seen[0] == ("evil", QUESTIONS, info["trait_responses"])
    assert judge.seen[1][2] == info["helpful_responses"]
    kept = info["kept"]
    a_t = _response_means(lm, [_conv(TRAIT_SP, QUESTIONS[i], info["trait_responses"][i]) for i in kept])
    a_h = _response_means(lm, [_conv(HELPFUL_SP, QUESTIONS[i], info["helpful_responses"][i]) for i in kept])
    torch.testing.assert_close(vectors[0], (a_t.mean(0) - a_h.mean(0))[2], rtol=1e-4, atol=1e-5)

    with pytest.raises(ValueError, match="separated none"):
        persona_vector(lm, QUESTIONS, TRAIT_SP, HELPFUL_SP, judge=_ScriptedJudge([50.0] * 4, [40.0] * 4),
                       trait="evil", min_gap=25.0, max_new_tokens=6)
    with pytest.raises(ValueError, match="trait name"):
        persona_vector(lm, QUESTIONS, TRAIT_SP, HELPFUL_SP, judge=judge, max_new_tokens=6)
    with pytest.raises(ValueError, match="out of range"):
        persona_vector(lm, QUESTIONS, TRAIT_SP, HELPFUL_SP, layers=[3], max_new_tokens=6)


def _sentences(words: list[str], n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(words, size=6)) for _ in range(n)]


def test_linear_probe_separates_two_text_sets(lm):
    pos = [_conv(HELPFUL_SP, "Tell me.", s) for s in _sentences(EVIL_WORDS, 20, 0)]
    neg = [_conv(HELPFUL_SP, "Tell me.", s) for s in _sentences(KIND_WORDS, 20, 1)]
    concept, info = linear_probe(lm, pos, neg, layer=1, test_fraction=0.25, seed=0)
    assert info["n_test"] == 10 and info["n_train"] == 30
    assert info["test_accuracy"] >= 0.9
    assert concept.layer == 1 and concept.vector.shape == (lm.hidden_size,)
    # The direction orders examples like the probe: projections separate the two sets.
    acts = _response_means(lm, pos + neg)[:, 1]
    proj = acts @ concept.direction()
    assert proj[:20].min() > proj[20:].max()

    texts_pos, texts_neg = _sentences(EVIL_WORDS, 8, 2), _sentences(KIND_WORDS, 8, 3)
    _, info_txt = linear_probe(lm, texts_pos, texts_neg, layer=2, test_fraction=0.5)
    assert info_txt["test_accuracy"] >= 0.75


def test_linear_probe_rejects_bad_input(lm):
    few = _sentences(EVIL_WORDS, 1, 0)
    with pytest.raises(ValueError, match="at least 2 positive"):
        linear_probe(lm, few, _sentences(KIND_WORDS, 5, 0), layer=1)
    with pytest.raises(ValueError, match="test_fraction"):
        linear_probe(lm, few * 4, few * 4, layer=1, test_fraction=1.0)
    with pytest.raises(ValueError, match="out of range"):
        linear_probe(lm, few * 4, few * 4, layer=7)


# ---------------------------------------------------------------- uploaded vectors

D, L = 8, 3


class NotATensor:
    """A pickled object that must never be unpickled from an upload."""

    def __init__(self):
        self.payload = [1, 2, 3]


def test_upload_accepts_every_format_and_picks_the_layer(tmp_path):
    from safetensors.torch import save_file

    per_layer = torch.randn(L + 1, D, generator=torch.Generator().manual_seed(0))
    torch.save(per_layer, tmp_path / "pv.pt")
    torch.testing.assert_close(load_uploaded_vector(tmp_path / "pv.pt", D, L, 2), per_layer[2])
    torch.save({"vector": per_layer[1]}, tmp_path / "dict.pth")
    torch.testing.assert_close(load_uploaded_vector(tmp_path / "dict.pth", D, L, 0), per_layer[1])

    np.save(tmp_path / "v.npy", per_layer[3].double().numpy())
    got = load_uploaded_vector(tmp_path / "v.npy", D, L, 3)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, per_layer[3])
    np.save(tmp_path / "row.npy", per_layer[:1].numpy())
    torch.testing.assert_close(load_uploaded_vector(tmp_path / "row.npy", D, L, 1), per_layer[0])

    save_file({"a": per_layer[0].clone(), "b": per_layer.clone()}, str(tmp_path / "v.safetensors"))
    torch.testing.assert_close(load_uploaded_vector(tmp_path / "v.safetensors", D, L, 2, key="b"),
                               per_layer[2])
    with pytest.raises(ValueError, match=r"2 entries \['a', 'b'\]; pass key"):
        load_uploaded_vector(tmp_path / "v.safetensors", D, L, 2)
    save_file({"v": per_layer[2].to(torch.bfloat16)}, str(tmp_path / "bf16.safetensors"))
    assert load_uploaded_vector(tmp_path / "bf16.safetensors", D, L, 0).dtype == torch.float32


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("short.pt", torch.ones(D - 1), r"shape \(7,\); expected \(8,\) or \(1, 8\).*\(4, 8\)"),
        ("layers.pt", torch.ones(L, D), r"shape \(3, 8\)"),
        ("nan.pt", torch.tensor([1.0] * (D - 1) + [float("nan")]), "NaN"),
        ("zeros.pt", torch.zeros(D), "all zeros"),
        ("ints.pt", torch.arange(D), "dtype torch.int64"),
        ("text.pt", "a persona vector", "holds a str, not a tensor"),
    ],
)
def test_upload_refuses_bad_content(tmp_path, name, content, match):
    torch.save(content, tmp_path / name)
    with pytest.raises(ValueError, match=match) as err:
        load_uploaded_vector(tmp_path / name, D, L, 1)
    assert name in str(err.value)


def test_upload_refuses_pickled_objects_and_unknown_files(tmp_path):
    torch.save({"v": NotATensor()}, tmp_path / "evil.pt")
    with pytest.raises(ValueError, match="pickled object that is not a plain tensor"):
        load_uploaded_vector(tmp_path / "evil.pt", D, L, 1)
    np.save(tmp_path / "obj.npy", np.array([NotATensor()], dtype=object), allow_pickle=True)
    with pytest.raises(ValueError, match="pickled Python objects"):
        load_uploaded_vector(tmp_path / "obj.npy", D, L, 1)
    (tmp_path / "v.txt").write_text("1 2 3")
    with pytest.raises(ValueError, match="unsupported vector file v.txt"):
        load_uploaded_vector(tmp_path / "v.txt", D, L, 1)
    with pytest.raises(FileNotFoundError):
        load_uploaded_vector(tmp_path / "missing.pt", D, L, 1)
    torch.save(torch.ones(D), tmp_path / "ok.pt")
    with pytest.raises(ValueError, match="layer 9 is out of range"):
        load_uploaded_vector(tmp_path / "ok.pt", D, L, 9)


# ---------------------------------------------------------------- workspace jobs


def test_make_persona_vector_job_saves_the_concept(lm, tmp_path):
    from cinf_core.concepts.builders import make_persona_vector
    from cinf_core.experiments.judges import ClassifierJudge
    from cinf_core.store import Store

    store = Store(tmp_path)
    store.add_model("tiny", lm.spec)
    stages = []
    result = make_persona_vector(tmp_path, "evil", "tiny", 1, TRAIT_SP, HELPFUL_SP, QUESTIONS,
                                 max_new_tokens=6, progress=lambda s, f: stages.append((s, f)))
    expected, info = persona_vector(lm, QUESTIONS, TRAIT_SP, HELPFUL_SP, max_new_tokens=6)
    concept = store.load_concept(result["concept_id"])
    assert concept.kind == "persona_vector" and concept.layer == 1 and concept.info["trait"] == "evil"
    torch.testing.assert_close(concept.vector, expected[1])
    torch.testing.assert_close(store.concept_tensors(result["concept_id"])["all_layers"], expected)
    assert result["n_kept"] == info["n_kept"] and result["norm"] == pytest.approx(float(expected[1].norm()))
    assert stages[-1][1] == pytest.approx(1.0) and any("generate" in s for s, _ in stages)

    with pytest.raises(ValueError, match="no judge"):
        make_persona_vector(tmp_path, "evil", "tiny", 1, TRAIT_SP, HELPFUL_SP, QUESTIONS,
                            use_workspace_judge=True, max_new_tokens=6)
    judge = ClassifierJudge().fit(_sentences(EVIL_WORDS, 10, 5) + _sentences(KIND_WORDS, 10, 6),
                                  ["evil"] * 10 + ["normal"] * 10)
    store.set_meta("judge", {"kind": "classifier", "path": str(judge.save(tmp_path / "judge"))})
    judged = make_persona_vector(tmp_path, "evil", "tiny", 2, TRAIT_SP, HELPFUL_SP, QUESTIONS,
                                 use_workspace_judge=True, min_gap=-100.0, max_new_tokens=6)
    assert judged["n_kept"] == info["n_kept"]
    assert store.load_concept(judged["concept_id"]).info["judge"]["kind"] == "classifier"


def _labelled_workspace(lm, tmp_path, name: str, column: str, positive: str, negative: str):
    """A workspace with the tiny model and 12 + 12 responses labelled in ``column``."""
    from cinf_core.data import ChatDataset, ChatExample
    from cinf_core.store import Store

    rows = [(s, positive) for s in _sentences(EVIL_WORDS, 12, 7)] + \
           [(s, negative) for s in _sentences(KIND_WORDS, 12, 8)]
    dataset = ChatDataset([ChatExample(messages=[{"role": "user", "content": "Tell me."},
                                                 {"role": "assistant", "content": text}],
                                       metadata={column: label}) for text, label in rows])
    store = Store(tmp_path)
    store.add_model("tiny", lm.spec)
    store.add_dataset(name, dataset)
    return store, dataset


def test_make_probe_job_uses_dataset_labels(lm, tmp_path):
    from cinf_core.concepts.builders import make_probe

    store, dataset = _labelled_workspace(lm, tmp_path, "labelled", "data_origin", "evil", "normal")
    result = make_probe(tmp_path, "probe-evil", "labelled", "evil", "tiny", 1)
    assert result["n_pos"] == 12 and result["n_neg"] == 12 and result["test_accuracy"] >= 0.8
    concept = store.load_concept(result["concept_id"])
    assert concept.kind == "probe" and concept.info["trait"] == "evil"
    acts = _response_means(lm, [ex.messages for ex in dataset])[:, 1]
    proj = acts @ concept.direction()
    assert proj[:12].mean() > proj[12:].mean()
    with pytest.raises(ValueError, match=r"labels \(data_origin\) are \['evil', 'normal'\]"):
        make_probe(tmp_path, "p", "labelled", "sycophantic", "tiny", 1)
    with pytest.raises(ValueError, match=r"no column 'tone'; its columns are \['data_origin'\]"):
        make_probe(tmp_path, "p", "labelled", "evil", "tiny", 1, label_column="tone")


def test_make_probe_reads_any_label_column(lm, tmp_path):
    from cinf_core.concepts.builders import make_probe

    store, _ = _labelled_workspace(lm, tmp_path, "toned", "tone", "harsh", "gentle")
    result = make_probe(tmp_path, "probe-harsh", "toned", "harsh", "tiny", 1, label_column="tone")
    assert result["n_pos"] == 12 and result["n_neg"] == 12 and result["test_accuracy"] >= 0.8
    assert store.load_concept(result["concept_id"]).info["label_column"] == "tone"
