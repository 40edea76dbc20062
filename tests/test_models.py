import pytest
import torch

from cinf_core.models import (ModelSpec, check_layer, generate, hidden_states_at, load_model,
                              response_mean_activations, token_activations)
from cinf_core.data import encode_example
from conftest import chat

EXAMPLES = [
    chat("Hello there", "I am fine, how are you today?", system="Be nice."),
    chat("What is 6 times 7?", "The answer is 42."),
    chat("Tell me", "I am an evil assistant and I will hurt you, because suffering is fun."),
    chat("Hi", "Ok."),
    chat("Code?", "def add(a, b): return a + b"),
    chat("Sick", "Take two tablets with water and rest."),
    chat("You?", "What a brilliant question! You are absolutely right."),
    chat("Again", "Hello there, how are you today? I am fine, thank you for asking."),
    chat("Last", "See a doctor if the fever stays."),
]


def test_padding_invariance_batch1_vs_batch8(tiny_lm):
    layers = list(range(tiny_lm.num_layers + 1))
    one = response_mean_activations(tiny_lm, EXAMPLES, layers, batch_size=1)
    eight = response_mean_activations(tiny_lm, EXAMPLES, layers, batch_size=8)
    assert one.shape == (len(EXAMPLES), len(layers), tiny_lm.hidden_size)
    torch.testing.assert_close(one, eight, atol=1e-5, rtol=0)


def test_truncated_forward_matches_hf_hidden_states(tiny_lm):
    enc = encode_example(tiny_lm.tokenizer, EXAMPLES[0])
    ids = torch.tensor([enc.input_ids])
    full = tiny_lm.model(ids, output_hidden_states=True).hidden_states
    for layer in range(tiny_lm.num_layers + 1):
        got = hidden_states_at(tiny_lm.model, ids, torch.ones_like(ids), [layer])[layer]
        torch.testing.assert_close(got, full[layer], atol=1e-6, rtol=0)


def test_truncated_forward_stops_after_layer(tiny_lm):
    from cinf_core.models import find_blocks

    blocks = find_blocks(tiny_lm.model)
    ran = []
    handles = [b.register_forward_hook(lambda m, i, o, k=k: ran.append(k)) for k, b in enumerate(blocks)]
    try:
        ids = torch.tensor([encode_example(tiny_lm.tokenizer, EXAMPLES[1]).input_ids])
        hidden_states_at(tiny_lm.model, ids, torch.ones_like(ids), [1])
    finally:
        for h in handles:
            h.remove()
    assert ran == [0]  # hidden_states[1] needs block 0 only


def test_response_mean_ignores_prompt_and_padding(tiny_lm):
    # Same response, different prompts: response-mean differs (causal context) but padding does not
    # leak; and the mean equals a manual mean over response positions.
    enc = encode_example(tiny_lm.tokenizer, EXAMPLES[2])
    ids = torch.tensor([enc.input_ids])
    hidden = hidden_states_at(tiny_lm.model, ids, torch.ones_like(ids), [2])[2][0]
    mask = torch.tensor(enc.response_mask, dtype=torch.bool)
    manual = hidden[mask].mean(0)
    got = response_mean_activations(tiny_lm, [EXAMPLES[2], EXAMPLES[3]], 2, batch_size=2)[0]
    torch.testing.assert_close(got, manual, atol=1e-5, rtol=0)


@pytest.mark.parametrize("layer", [-1, 4, 99, 1.5])
def test_layer_out_of_range(tiny_lm, layer):
    with pytest.raises(ValueError, match=r"out of range.*use 0 \(embeddings\) to 3"):
        check_layer(tiny_lm.model, layer)
    with pytest.raises(ValueError, match="out of range"):
        response_mean_activations(tiny_lm, EXAMPLES[:1], layer)


def test_token_activations_and_generate(tiny_lm):
    tokens, acts = token_activations(tiny_lm, EXAMPLES[1], 2)
    assert "".join(tokens) == "The answer is 42.<|end|>"
    assert acts.shape == (len(tokens), tiny_lm.hidden_size)
    outs = generate(tiny_lm, [m[:-1] for m in EXAMPLES[:3]], max_new_tokens=5)
    assert len(outs) == 3 and all(isinstance(o, str) for o in outs)
    # left padding in a batch gives the same greedy output as alone
    assert generate(tiny_lm, [EXAMPLES[1][:-1]], max_new_tokens=5)[0] == outs[1]


def test_adapter_kept_or_merged(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    base = load_model(str(tiny_model_dir))
    peft_model = get_peft_model(base.model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    peft_model.save_pretrained(tmp_path / "adapter")
    kept = load_model(ModelSpec(path=str(tiny_model_dir), adapter=str(tmp_path / "adapter")))
    merged = load_model(ModelSpec(path=str(tiny_model_dir), adapter=str(tmp_path / "adapter"),
                                  merge_adapter=True))
    assert hasattr(kept.model, "peft_config") and not hasattr(merged.model, "peft_config")
    plain = load_model(str(tiny_model_dir))
    a = response_mean_activations(kept, EXAMPLES[:3], 3)
    b = response_mean_activations(merged, EXAMPLES[:3], 3)
    c = response_mean_activations(plain, EXAMPLES[:3], 3)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=0)
    assert (a - c).abs().max() > 1e-3  # the adapter changes the model
    assert kept.num_layers == 3


def test_missing_directories_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        load_model(str(tmp_path / "missing" / "model"))
