"""LoRA fine-tuning: deterministic given its seed, response-token loss, adapters that load back."""
import random

import pytest
import torch

from cinf_core.data import encode_dataset
from cinf_core.finetune import LoraRecipe, finetune_lora, length_bucketed_batches
from conftest import SMALL_TEXTS, chat

RECIPE = LoraRecipe(r=2, alpha=4, batch_size=4, epochs=1.0, max_length=64)


def _rows(n: int = 10) -> list[list[dict]]:
    return [chat(f"question {i}?", SMALL_TEXTS[i % len(SMALL_TEXTS)]) for i in range(n)]


def test_finetune_lora_is_deterministic_and_loads_back(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    from cinf_core.models import ModelSpec, load_model

    seen = []
    reports = [finetune_lora(tiny_model_dir, _rows(), RECIPE, seed=5, out_dir=tmp_path / n,
                             progress=lambda stage, f: seen.append((stage, f)))
               for n in "ab"]
    assert reports[0].steps == 3 and reports[0].final_loss == reports[1].final_loss
    assert reports[0].extra["n_examples"] == 10 and reports[0].response_tokens > 0
    a, b = (load_file(str(tmp_path / n / "adapter_model.safetensors")) for n in "ab")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert {s for s, _ in seen} == {"fine-tune LoRA"} and seen[0][1] == 0.0 and seen[-1][1] == 1.0

    base = load_model(ModelSpec(path=str(tiny_model_dir)))
    tuned = load_model(ModelSpec(path=str(tiny_model_dir), adapter=str(tmp_path / "a")))
    ids = torch.tensor([[1, 2, 3, 4]])
    assert not torch.allclose(base.model(input_ids=ids).logits, tuned.model(input_ids=ids).logits)


def test_finetune_lora_refuses_an_empty_subset(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="no examples"):
        finetune_lora(tiny_model_dir, [], RECIPE, seed=5, out_dir=tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_length_bucketed_batches_cover_every_example_once(tiny_lm):
    texts = [" ".join(["word"] * n) for n in range(1, 41)]
    encoded, _ = encode_dataset(tiny_lm.tokenizer, [chat("q", t) for t in texts])
    batches = length_bucketed_batches(encoded, 8, random.Random(0))
    assert sorted(i for b in batches for i in b) == list(range(40))
    assert all(len(b) == 8 for b in batches)
    # One window holds all 40, so the batches cut the length-sorted examples into runs.
    runs = sorted(sorted(len(encoded[i].input_ids) for i in b) for b in batches)
    assert sum(runs, []) == sorted(len(e.input_ids) for e in encoded)


def test_lora_recipe_round_trips_and_ignores_unknown_keys():
    d = RECIPE.to_dict()
    assert isinstance(d["target_modules"], list)
    assert LoraRecipe.from_dict({**d, "from_a_newer_version": 1}) == RECIPE
