import pytest

from cinf_core.methods.memory import PRESETS, estimate, linear_shapes


def test_factor_memory_from_shapes():
    cfg = dict(hidden_size=8, intermediate_size=16, num_hidden_layers=4, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=10)
    shapes = linear_shapes(cfg)
    assert ("k_proj", 8, 4) in shapes and ("down_proj", 16, 8) in shapes
    per_block = sum(i * i + o * o + 2 * i * o for _, i, o in shapes)
    est = estimate(cfg, block_stride=2)
    assert est.n_modules == 14
    assert est.factor_gib * 2**30 == pytest.approx(4 * 2 * per_block)
    assert estimate(cfg, below_layer=1).n_modules == 7
    assert estimate(cfg, lora_rank=2).n_modules == 2 * 28


def test_presets_are_consistent():
    qwen = estimate(PRESETS["Qwen2.5-7B"], weight_bytes=2)
    # 7.6B parameters in bf16 ~ 14 GiB
    assert 13 < qwen.weights_gib < 16


def test_a_workspace_models_own_shapes(tiny_model_dir, tmp_path, capsys):
    """memory --model reads the model's config: grouped-query k/v widths, a tied head counted
    once, and the LoRA rank of its adapter."""
    import json

    from transformers import AutoConfig

    from cinf_core.cli import main
    from cinf_core.methods.memory import config_shapes

    cfg = config_shapes(AutoConfig.from_pretrained(tiny_model_dir))
    assert cfg["hidden_size"] == 32 and cfg["num_hidden_layers"] == 3
    tied = estimate({**cfg, "tie_word_embeddings": True}, weight_bytes=4)
    untied = estimate({**cfg, "tie_word_embeddings": False}, weight_bytes=4)
    assert (untied.weights_gib - tied.weights_gib) * 2**30 == pytest.approx(
        4 * cfg["vocab_size"] * cfg["hidden_size"])
    assert main(["add-model", str(tiny_model_dir), "--name", "tiny", "--workspace",
                 str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["memory", "--model", "tiny", "--workspace", str(tmp_path)]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["memory"]
    assert [r["model"] for r in rows] == ["tiny"] * 4
    assert rows[0]["factor_gib"] == estimate(cfg).as_dict()["factor_gib"]
    with pytest.raises(ValueError, match="no intermediate_size"):
        config_shapes({"hidden_size": 8})


@pytest.mark.parametrize("targets", [None, ("q_proj", "v_proj")])
def test_the_adapter_row_counts_what_the_default_selection_tracks(tiny_lm, targets):
    """On a peft model cinf's default selection tracks each adapted Linear's base weight and its
    LoRA A and B: the estimate's first row for a model with an adapter counts exactly those
    modules (and their factor floats), also when the adapter adapts only some Linears."""
    import copy

    from peft import LoraConfig, get_peft_model

    from cinf_core.curvature import CurvatureConfig
    from cinf_core.curvature.modules import select_modules
    from cinf_core.curvature.tape import grad_shape
    from cinf_core.methods.memory import config_shapes, memory_table

    all_linears = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    peft_model = get_peft_model(copy.deepcopy(tiny_lm.model), LoraConfig(
        r=2, lora_alpha=4, target_modules=list(targets or all_linears)))
    tracked = select_modules(peft_model, CurvatureConfig())
    floats = sum(i * i + o * o + 2 * o * i for o, i in map(grad_shape, tracked.values()))
    cfg = config_shapes(tiny_lm.model.config)
    rows = memory_table({"tiny": cfg}, {"tiny": 2}, {"tiny": targets} if targets else None)
    assert rows[0]["setting"].startswith("IF, all blocks: base + LoRA r=2")
    assert rows[0]["n_modules"] == len(tracked)
    est = estimate(cfg, lora_rank=2, with_base=True, lora_targets=targets)
    assert est.factor_gib * 2**30 == pytest.approx(4 * floats)
    lora_only = estimate(cfg, lora_rank=2, lora_targets=targets)
    assert lora_only.n_modules == sum("lora_" in n for n in tracked)
