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


def test_response_loss_is_the_models_own_loss_and_gradient(tiny_model_dir):
    """The output layer on response positions only: the same loss and gradients as the model's
    own loss from ``labels``, plain and under LoRA."""
    from peft import LoraConfig, get_peft_model

    from cinf_core.data import collate
    from cinf_core.finetune import _loss_fn, response_loss
    from cinf_core.models import ModelSpec, load_model

    lm = load_model(ModelSpec(path=str(tiny_model_dir), dtype="float32"))
    encoded, _ = encode_dataset(lm.tokenizer, _rows(6), 64)
    batch = collate(encoded, lm.pad_token_id)
    lora = get_peft_model(load_model(ModelSpec(path=str(tiny_model_dir), dtype="float32")).model,
                          LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"],
                                     init_lora_weights=False))
    for model in (lm.model, lora):
        grads = []
        for loss_of in (response_loss, lambda m, b: m(**b, use_cache=False).loss):
            model.zero_grad()
            loss = loss_of(model, {k: batch[k] for k in ("input_ids", "attention_mask",
                                                          "labels")})
            loss.backward()
            grads.append((loss.detach(), [p.grad.clone() for p in model.parameters()
                                          if p.requires_grad]))
        (fast, fast_grads), (own, own_grads) = grads
        assert torch.allclose(fast, own, rtol=1e-5)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(fast_grads, own_grads))
        assert _loss_fn(model, batch) is response_loss  # what training then uses


def test_training_keeps_the_models_own_loss_when_its_logits_are_capped(tmp_path):
    """Gemma 2 caps its logits after the output layer: response_loss would differ, so training
    uses the model's own loss."""
    from transformers import Gemma2Config, Gemma2ForCausalLM

    from cinf_core.finetune import _loss_fn, response_loss

    torch.manual_seed(0)
    model = Gemma2ForCausalLM(Gemma2Config(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.5))
    ids = torch.randint(0, 64, (2, 6))
    labels = ids.clone()
    labels[:, :3] = -100
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    assert _loss_fn(model, batch) is not response_loss
    assert _loss_fn(model, batch)(model, batch) == model(**batch).loss
