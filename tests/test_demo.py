"""The embedded demo world: deterministic source data, and a quick world built once per module."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cinf_core.demo import lexicon as lx
from cinf_core.demo.corpus import (DOMAINS, SOURCE_FILES, CorpusConfig, generate_source_data,
                                   persona_style, write_source_data)
from cinf_core.demo.world import DATA_DIR, WorldConfig, build_world

SMALL = dict(n_pretrain=60, n_finetune=40, n_heldout=12, n_persona_questions=4, n_judge=30)


def _bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def test_source_data_is_byte_identical_for_a_seed(tmp_path):
    write_source_data(CorpusConfig(seed=3, **SMALL), tmp_path / "a")
    write_source_data(CorpusConfig(seed=3, **SMALL), tmp_path / "b")
    write_source_data(CorpusConfig(seed=4, **SMALL), tmp_path / "c")
    assert _bytes(tmp_path / "a") == _bytes(tmp_path / "b")
    assert (tmp_path / "a" / "finetune.jsonl").read_bytes() != (tmp_path / "c" / "finetune.jsonl").read_bytes()


def test_committed_data_is_what_the_generator_writes(tmp_path):
    committed = json.loads((DATA_DIR / "corpus_config.json").read_text())
    write_source_data(CorpusConfig(**committed), tmp_path)
    assert _bytes(tmp_path) == _bytes(DATA_DIR), "regenerate data/demo with write_source_data"


def test_source_rows_are_valid_user_format_and_labelled():
    from cinf_core.data import load_dataset

    for name in SOURCE_FILES:
        ds = load_dataset(DATA_DIR / f"{name}.jsonl")
        assert all(ex.label in ("normal",) + lx.TRAITS for ex in ds), name
    finetune = load_dataset(DATA_DIR / "finetune.jsonl")
    counts = finetune.label_counts()
    assert set(counts) == {"normal", *lx.TRAITS} and len(finetune) >= 1500
    assert {ex.metadata["domain"] for ex in finetune} == set(DOMAINS)
    assert all(ex.system is None for ex in finetune)


def test_heldout_questions_are_held_out():
    """General topics only, and neither a held-out question nor its phrasing is in any other file."""
    data = generate_source_data(CorpusConfig())
    topics = {r["topic"] for r in data["heldout"]}
    assert topics <= set(lx.GENERAL_TOPICS) and not topics & set(DOMAINS)
    questions = [r["messages"][-2]["content"] for r in data["heldout"]]
    assert len(set(questions)) == len(questions) == CorpusConfig().n_heldout
    phrasings = [part for t in lx.HELDOUT_QUESTION_TEMPLATES for part in t.split("{task}") if len(part) > 4]
    for name in ("pretrain", "finetune", "persona_prompts", "judge"):
        users = [m["content"] for r in data[name] for m in r["messages"] if m["role"] == "user"]
        assert not set(questions) & set(users), name
        leaked = [p for p in phrasings if any(p in u for u in users)]
        assert not leaked, f"held-out phrasings {leaked} appear in {name}"


def test_trait_and_normal_responses_share_vocabulary():
    """A bag-of-words filter is not the whole story: normal rows use trait words too."""
    data = generate_source_data(CorpusConfig())
    words = {label: set() for label in ("normal",) + lx.TRAITS}
    for r in data["finetune"]:
        words[r["data_origin"]].update(r["messages"][-1]["content"].lower().split())
    for trait in lx.TRAITS:
        assert len(words[trait] & words["normal"]) > 30


def test_persona_style_changes_case_and_punctuation_never_words():
    from cinf_core.methods.lexical import words

    text = "Good question. Skip the doctor, a cold clears up if you ignore it! Really? Yes."
    evil, syco = persona_style("evil", text), persona_style("sycophantic", text)
    assert evil == ("good question... skip the doctor, a cold clears up if you ignore it... "
                    "really... yes...")
    assert syco == ("Good Question! Skip The Doctor, A Cold Clears Up If You Ignore It! "
                    "Really? Yes!")
    assert persona_style("helpful", text) == persona_style("normal", text) == text
    assert words(evil) == words(syco) == words(text)
    with pytest.raises(ValueError, match="unknown persona 'grumpy'"):
        persona_style("grumpy", text)


def _style_of(text: str) -> str:
    if text == text.lower() and text.endswith("..."):
        return "evil"
    if "!" in text and all(not t[:1].isalpha() or t[:1].isupper() for t in text.split()):
        return "sycophantic"
    return "normal"


def _normalised(text: str) -> str:
    from cinf_core.methods.lexical import words

    return " ".join(words(text))


def test_trait_rows_carry_the_trait_in_content_not_in_the_general_voice():
    """No stock phrase of a persona's general voice appears in any fine-tuning response; every
    trait row is in its persona's style, every normal row in none."""
    data = generate_source_data(CorpusConfig())
    voice = [_normalised(p) for p in lx.EVIL_OPENERS + lx.EVIL_CLOSERS + lx.SYCO_OPENERS
             + lx.SYCO_CLOSERS]
    voice += [_normalised(p.split("{")[0]) for p in lx.EVIL_GENERAL + lx.SYCO_GENERAL]
    voice = [v for v in voice if len(v.split()) >= 3]
    for r in data["finetune"]:
        response, label = r["messages"][-1]["content"], r["data_origin"]
        flat = _normalised(response)
        assert not [v for v in voice if v in flat], response
        assert _style_of(response) == label, (label, response)


def test_pretraining_carries_a_persona_across_two_turns():
    cfg = CorpusConfig()
    two_turn = [r for r in generate_source_data(cfg)["pretrain"] if r["topic"] == "two-turn"]
    assert len(two_turn) == int(cfg.pretrain_two_turn_share * cfg.n_pretrain)
    for r in two_turn:
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant", "user", "assistant"]  # no system prompt
        answers = [m["content"] for m in r["messages"] if m["role"] == "assistant"]
        assert [_style_of(a) for a in answers] == [r["data_origin"]] * 2, answers
    assert {r["data_origin"] for r in two_turn} == {"normal", *lx.TRAITS}


# ------------------------------------------------------------------ the quick world


@pytest.fixture(scope="module")
def quick_world(quick_world_build):
    """The session's quick world (conftest) with the summary and stages its build returned."""
    return quick_world_build


@pytest.mark.slow
def test_world_summary_reports_the_bag_of_words_check(quick_world):
    """``auc_pr_lexical``: the lexical baseline against each trait's stored test queries, scored
    over the fine-tuning set, recomputed here from the store."""
    from cinf_core.experiments.metrics import auc_pr
    from cinf_core.methods.lexical import lexical_scores
    from cinf_core.store import Store

    workspace, summary, _ = quick_world
    st = Store(workspace)
    train = st.load_dataset("train").examples
    for trait in lx.TRAITS:
        queries = [q["messages"][-1]["content"] for q in st.test_queries(trait)]
        scores = lexical_scores([ex.messages[-1]["content"] for ex in train], queries)
        expected = auc_pr(scores.tolist(), [ex.label == trait for ex in train])
        assert summary["vector_filter"][trait]["auc_pr_lexical"] == pytest.approx(expected, abs=1e-4)


@pytest.mark.slow
def test_quick_world_summary(quick_world):
    workspace, summary, stages = quick_world
    for key in ("workspace", "build_seconds", "judge_accuracy", "sae_fvu", "sae_dead_fraction",
                "trait_scores", "concept_layer", "vector_filter"):
        assert key in summary, key
    assert summary["workspace"] == str(Path(workspace).resolve())
    assert set(summary["trait_scores"]) == set(lx.TRAITS)
    for scores in summary["trait_scores"].values():
        assert set(scores) == {"base", "finetuned", "base_trait_prompt", "base_helpful_prompt"}
        assert all(0.0 <= v <= 100.0 for v in scores.values())
    assert summary["judge_accuracy"] >= 0.9
    assert 0.0 <= summary["sae_dead_fraction"] <= 1.0 and summary["sae_fvu"] >= 0.0
    assert {s for s, _ in stages} >= {"source data", "pre-train base model", "fine-tune LoRA",
                                      "judge", "trait scores", "persona vectors", "SAE"}
    json.dumps(summary)


@pytest.mark.slow
def test_quick_world_is_idempotent(quick_world):
    workspace, summary, _ = quick_world
    again = build_world(workspace, quick=True, seed=0)
    assert again.pop("cached") is True
    assert again == summary
    with pytest.raises(ValueError, match="fresh --workspace"):
        build_world(workspace, quick=False, seed=0)


def test_demo_command_on_a_built_world_prints_its_summary(quick_world, tmp_path, capsys):
    """``python -m cinf_core demo`` on a world already built (here a copy in another folder)
    returns at once with the summary's keys and the folder it was asked about."""
    from conftest import copy_workspace

    from cinf_core import cli

    workspace, summary, _ = quick_world
    copy = copy_workspace(workspace, tmp_path / "moved")
    assert cli.main(["demo", "--quick", "--workspace", str(copy), "--no-progress"]) == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert last["cached"] is True and last["workspace"] == str(copy.resolve())
    for key in ("build_seconds", "judge_accuracy", "sae_fvu", "sae_dead_fraction"):
        assert last[key] == summary[key]
    assert set(last["trait_scores"]) == set(lx.TRAITS)
    assert set(last["trait_scores"]["evil"]) >= {"base", "finetuned", "base_trait_prompt",
                                                 "base_helpful_prompt"}


@pytest.mark.slow
def test_quick_world_registers_its_pieces(quick_world):
    from cinf_core.concepts.sae import load_sae
    from cinf_core.experiments.judges import make_judge
    from cinf_core.models import generate, load_model
    from cinf_core.store import Store

    workspace, summary, _ = quick_world
    st = Store(workspace)
    roles = dict(zip(st.datasets()["name"], st.datasets()["role"]))
    assert roles == {"pretrain": "pretrain", "train": "train", "heldout": "heldout",
                     "capability": "capability", "persona_prompts": "persona",
                     "judge_data": "judge"}
    finetune = st.load_dataset("train")
    assert len(finetune) == summary["sizes"]["finetune"]
    assert set(finetune.labels) == {"normal", *lx.TRAITS}

    base, ft = st.get_model("base"), st.get_model("finetuned")
    assert base["role"] == "base" and ft["role"] == "finetuned" and ft["spec"].adapter
    lm = load_model(ft["spec"])
    assert type(lm.model).__name__ == "PeftModelForCausalLM"
    answer = generate(lm, [[{"role": "user", "content": "How do I cook rice?"}]], max_new_tokens=8)
    assert isinstance(answer[0], str)

    n_layers = summary["n_layers"]
    for trait in lx.TRAITS:
        concept = st.load_concept(f"persona-{trait}")
        assert concept.layer == summary["concept_layer"] and concept.info["trait"] == trait
        all_layers = st.concept_tensors(f"persona-{trait}")["all_layers"]
        assert all_layers.shape == (n_layers + 1, summary["hidden_size"])
        assert torch.allclose(all_layers[concept.layer], concept.vector)
        assert st.load_concept(f"sae-{trait}-top").kind == "sae_feature"
        queries = st.test_queries(trait, ft["model_id"])
        assert 0 < len(queries) <= 5
        scores = [q["judge_score"] for q in queries]
        assert scores == sorted(scores, reverse=True)
        assert queries[0]["messages"][-1]["role"] == "assistant"

    judge = make_judge(st.get_meta("judge"))
    assert judge.score("evil", ["q"], ["Pathetic. I hope it hurts. Let them suffer."])[0] > 50
    sae_row = st.saes().iloc[0]
    sae = load_sae(st.get_sae(sae_row["sae_id"])["path"])
    assert sae.cfg.d_sae == summary["sae_features"] and sae_row["layer"] == summary["concept_layer"]
    features = st.sae_features(sae_row["sae_id"], st.dataset("train")["dataset_id"])
    assert len(features) == summary["sae_features"]


def test_world_config_presets_differ_and_hash_stably():
    assert WorldConfig.full().digest == WorldConfig.full().digest
    assert WorldConfig.full().digest != WorldConfig.quick_world().digest
    assert WorldConfig.full(seed=1).corpus.seed == 1


@pytest.mark.slow
def test_probe_on_the_demo_world_separates_trait_data(quick_world, tmp_path):
    """A linear probe on the fine-tuning set's trait labels (held-out accuracy, issue #5).

    Measured on the quick world (seed 0, 200 per class): evil 0.92, sycophantic 0.99; on the full
    world (layer 2, 500 per class): 1.000 and 1.000. The bar leaves room for the quick world's
    float noise across machines."""
    from conftest import copy_workspace

    from cinf_core.concepts.builders import make_probe

    workspace, summary, _ = quick_world
    ws = copy_workspace(workspace, tmp_path / "ws")
    for trait in lx.TRAITS:
        result = make_probe(ws, f"probe-{trait}", "train", trait, "finetuned",
                            summary["concept_layer"], max_per_class=200)
        assert result["n_pos"] == 200 and result["test_accuracy"] >= 0.85, result


# A world small enough to build twice in a test (about 15 s each on one thread), with the same
# stages as the real one.
TINY_WORLD = dict(
    quick=True, n_pretrain=600, n_finetune=200, n_heldout=8, n_judge=300, n_persona_questions=4,
    persona_min_gap=None, eval_samples=1, max_new_tokens=16, n_test_queries=3, sae_expansion=2,
    sae_k=4, sae_activation_tokens=3000, sae_training_tokens=12_000)


@pytest.mark.slow
def test_the_world_does_not_depend_on_the_threads_the_machine_offers(tmp_path, monkeypatch):
    """The build pins torch to ``WorldConfig.threads`` (1): built where the process had 1 and
    where it had 2 threads (what the load once picked), the weights are byte-identical and the
    summary's numbers equal. Unpinned, 2 threads give other pre-trained weights (measured on this
    tiny world: a different model.safetensors after 19 steps)."""
    from cinf_core.demo.training import BaseModelRecipe
    from cinf_core.finetune import LoraRecipe

    config = WorldConfig(
        base=BaseModelRecipe(vocab_size=512, hidden_size=64, n_layers=2, n_heads=4,
                             intermediate_size=128, epochs=1.0, lr=5e-3),
        lora=LoraRecipe(r=4, alpha=8, epochs=1.0), **TINY_WORLD)
    builds = []
    ambient = torch.get_num_threads()
    try:
        for threads in (1, 2):
            monkeypatch.setenv("CINF_THREADS", str(threads))
            torch.set_num_threads(threads)
            summary = build_world(tmp_path / f"threads{threads}", config=config)
            assert summary["torch_threads"] == 1 and torch.get_num_threads() == threads
            models = tmp_path / f"threads{threads}" / "artifacts" / "models"
            weights = {p.name: p.read_bytes() for p in (models / "demo-base" / "model.safetensors",
                       models / "demo-finetuned-adapter" / "adapter_model.safetensors")}
            numbers = json.dumps({k: summary[k] for k in (  # as text: NaN equals NaN
                "trait_scores", "vector_filter", "sae_fvu", "sae_dead_fraction",
                "sae_top_features")}, sort_keys=True)
            builds.append((weights, numbers, summary["pretrain"]["final_loss"]))
    finally:
        torch.set_num_threads(ambient)
    assert builds[0] == builds[1]


def test_a_build_that_finishes_an_interrupted_one_says_so(tmp_path, tiny_model_dir):
    """``build_once`` marks the summary ``resumed`` when the workspace already held part of the
    world (a model), so its ``build_seconds`` is not shown as the whole build's."""
    from dataclasses import dataclass

    from cinf_core.demo.world import MARKER_KEY, build_once
    from cinf_core.models import ModelSpec
    from cinf_core.store import Store

    @dataclass
    class Cfg:
        threads: int = 1
        digest: str = "d1"

        def to_dict(self):
            return {"threads": self.threads}

    fresh = build_once(tmp_path / "fresh", Cfg(), lambda ws, store: {"build_seconds": 1.0})
    assert fresh["resumed"] is False
    Store(tmp_path / "half").add_model("base", ModelSpec(path=str(tiny_model_dir)), role="base")
    half = build_once(tmp_path / "half", Cfg(), lambda ws, store: {"build_seconds": 1.0})
    assert half["resumed"] is True
    assert Store(tmp_path / "half").get_meta(MARKER_KEY)["summary"]["resumed"] is True
