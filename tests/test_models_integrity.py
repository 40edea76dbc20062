"""Broken checkpoints and adapters that do not fit their base are refused when they load (in
``add-model --check`` and every later load), with the offending keys and the usual cause named,
and nothing is stored; tied embeddings and a copy of the right base still load."""
import json
import shutil

import pytest
import torch

from cinf_core.cli import main
from cinf_core.models import ModelSpec, load_model
from cinf_core.store import Store
from conftest import make_tiny_model, store_snapshot


def _tokenizer_files(src, dst):
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "chat_template")):
            shutil.copy(f, dst / f.name)


def _refused(argv, ws, capsys) -> str:
    """Run ``add-model`` expecting a refusal; returns the error after checking nothing changed."""
    before = store_snapshot(ws)
    assert main(["add-model", *argv, "--check", "--workspace", str(ws)]) == 2
    error = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["error"]
    assert store_snapshot(ws) == before
    return error


@pytest.fixture
def ws(tmp_path):
    Store(tmp_path / "ws")
    return tmp_path / "ws"


def _lora(base_dir, out, targets=("q_proj", "v_proj")):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(str(base_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules=list(targets),
                                      init_lora_weights=False))
    model.save_pretrained(out)
    return model


def test_a_peft_wrapped_model_saved_as_a_base_is_refused(tiny_model_dir, tmp_path, ws, capsys):
    wrapped = tmp_path / "wrapped"
    _lora(tiny_model_dir, tmp_path / "adapter").get_base_model().save_pretrained(wrapped)
    _tokenizer_files(tiny_model_dir, wrapped)
    error = _refused([str(wrapped)], ws, capsys)
    assert f"model {wrapped}: the checkpoint does not fit its architecture" in error
    assert "randomly initialised: model.layers.0.self_attn.q_proj.weight" in error
    assert "q_proj.base_layer.weight" in error and "and 2 more" in error  # a few keys, not all
    assert "peft.get_peft_model wrapped its layers" in error and "--adapter" in error
    # every later load refuses it too (a model registered without --check)
    with pytest.raises(ValueError, match="PEFT keys"):
        load_model(str(wrapped))


def test_tied_embeddings_are_not_missing(tiny_model_dir, tmp_path):
    from transformers import AutoConfig, LlamaForCausalLM

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    cfg.tie_word_embeddings = True
    tied = tmp_path / "tied"
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(tied)
    _tokenizer_files(tiny_model_dir, tied)
    first, second = load_model(str(tied)), load_model(str(tied))
    assert first.model.lm_head.weight is first.model.get_input_embeddings().weight
    ids = torch.tensor([[1, 2, 3]])
    torch.testing.assert_close(first.model(ids).logits, second.model(ids).logits, rtol=0, atol=0)


@pytest.mark.parametrize("other,expected", [
    ({"n_layers": 4}, "9 parameter(s) of LlamaForCausalLM are not in it"),
    ({"hidden": 48}, "have another shape than config.json gives: "),
])
def test_a_config_of_another_model_is_refused(tiny_model_dir, tmp_path, ws, capsys, other,
                                              expected):
    folder = tmp_path / "mixed"
    shutil.copytree(tiny_model_dir, folder)
    other_model = make_tiny_model(tmp_path / "other", **other)
    shutil.copy(other_model / "config.json", folder / "config.json")
    error = _refused([str(folder)], ws, capsys)
    assert expected in error
    assert "the wrong folder" in error


def test_an_adapter_of_another_base_is_refused(tiny_model_dir, tmp_path, ws, capsys):
    _lora(tiny_model_dir, tmp_path / "adapter")
    other = make_tiny_model(tmp_path / "other_base", seed=1)  # same shapes, other weights
    error = _refused([str(other), "--adapter", str(tmp_path / "adapter")], ws, capsys)
    assert f"was trained on {tiny_model_dir}" in error and f"pass {tiny_model_dir}" in error
    copy = shutil.copytree(tiny_model_dir, tmp_path / "copy_of_base")  # the same model: fine
    assert main(["add-model", str(copy), "--adapter", str(tmp_path / "adapter"), "--check",
                 "--workspace", str(ws)]) == 0


def _unnamed(adapter):
    """Forget which base the adapter names, so only its shapes and modules can be checked."""
    cfg_path = adapter / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = None
    cfg_path.write_text(json.dumps(cfg))


def test_an_adapter_of_other_shapes_or_modules_is_refused(tiny_model_dir, tmp_path, ws, capsys):
    adapter = tmp_path / "adapter"
    _lora(tiny_model_dir, adapter)
    _unnamed(adapter)
    wide = make_tiny_model(tmp_path / "wide", hidden=48)
    error = _refused([str(wide), "--adapter", str(adapter)], ws, capsys)
    assert f"adapter {adapter} does not fit model {wide}: size mismatch for" in error
    assert "torch.Size([4, 32]) from checkpoint" in error

    deeper = make_tiny_model(tmp_path / "deeper", n_layers=4)  # layer 3 would get no weights
    error = _refused([str(deeper), "--adapter", str(adapter)], ws, capsys)
    assert "4 adapter weight(s) the model has modules for are not in the adapter" in error
    assert "layers.3.self_attn.q_proj.lora_A.weight" in error
    shallower = make_tiny_model(tmp_path / "shallower", n_layers=2)  # layer 2's weights unused
    error = _refused([str(shallower), "--adapter", str(adapter)], ws, capsys)
    assert "4 adapter weight(s) have no module in the model and would be ignored" in error

    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["target_modules"] = ["c_attn"]  # a GPT-2 module name: nothing in a Llama matches
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    error = _refused([str(tiny_model_dir), "--adapter", str(adapter)], ws, capsys)
    assert "Target modules {'c_attn'} not found in the base model" in error


def test_a_fitting_adapter_still_loads(tiny_model_dir, tmp_path):
    _lora(tiny_model_dir, tmp_path / "adapter")
    lm = load_model(ModelSpec(path=str(tiny_model_dir), adapter=str(tmp_path / "adapter")))
    assert hasattr(lm.model, "peft_config")
