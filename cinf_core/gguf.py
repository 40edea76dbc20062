"""GGUF (llama.cpp) files as ordinary Hugging Face model folders.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``, dequantized), but
the model it returns carries a quantization marker: ``save_pretrained`` refuses it, and PEFT,
hooks and every other loader here expect a plain folder. :func:`convert_gguf` therefore converts
a file once into ``<workspace>/artifacts/models/gguf/<stem>-<sha256[:12]>/`` (config,
safetensors weights, tokenizer with its chat template, and a record of the source file), and
``add-model`` registers that folder like any model. The same file converts once; a changed file
(another hash) converts into a new folder.
"""
from __future__ import annotations

import copy
import hashlib
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from . import paths
from .progress import ProgressFn

GGUF_MAGIC = b"GGUF"
GGUF_PIN = "gguf==0.19.0"
"""The package transformers reads GGUF files with, as requirements.txt pins it."""
LOGIT_TOLERANCE = 1e-4
"""Largest logit difference between the converted folder and the GGUF-loaded model that passes
(measured: 0.0 on SmolLM2-135M-Instruct Q4_1; the weights are copied, not recomputed)."""
_PROBE = "Hello! Could you tell me what the capital of France is?"
_CHUNK = 1 << 24


@dataclass
class GgufConversion:
    """Where a GGUF file was converted to and how that went (``convert_s`` and
    ``max_logit_diff`` are the first conversion's when the folder was ``reused``)."""

    folder: str
    source: str
    sha256: str
    architecture: str
    reused: bool
    convert_s: float
    max_logit_diff: float

    def to_dict(self) -> dict:
        return asdict(self)


def is_gguf_source(path: str) -> bool:
    """Whether add-model should convert ``path``: a name ending in ``.gguf``, or any existing
    file (a model is otherwise a folder or a hub id, so a file can only be meant as GGUF)."""
    return path.lower().endswith(".gguf") or Path(path).expanduser().is_file()


def convert_gguf(path: str | os.PathLike, workspace: str | os.PathLike,
                 progress: ProgressFn = None) -> GgufConversion:
    """Convert a GGUF file into a Hugging Face folder in ``workspace`` (or reuse the folder an
    earlier conversion of the same bytes wrote) and return where it is.

    A file transformers cannot load is refused before anything is written. The folder is written
    under a temporary name and renamed when complete, so a killed conversion leaves no folder
    that looks finished. Before the rename, the folder is loaded back (missing or unexpected keys
    refused) and its token ids and logits on a probe prompt are compared with the GGUF-loaded
    model's.
    """
    source = _check_gguf_file(path)
    sha256 = _sha256(source, progress)
    root = Path(workspace) / paths.ARTIFACTS_DIR / paths.MODELS_DIR / paths.GGUF_DIR
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", source.stem)
    folder = root / f"{stem}-{sha256[:12]}"
    record = folder / paths.GGUF_SOURCE_FILE
    if record.is_file():
        done = json.loads(record.read_text(encoding="utf-8"))
        if done.get("sha256") == sha256:
            return GgufConversion(**{**done, "folder": str(folder), "source": str(source),
                                     "reused": True})
    _remove_abandoned(root)
    partial = root / f".{folder.name}.partial-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    start = time.perf_counter()
    try:
        architecture, max_diff = _convert_into(source, partial, progress)
        result = GgufConversion(folder=str(folder), source=str(source), sha256=sha256,
                                architecture=architecture, reused=False,
                                convert_s=round(time.perf_counter() - start, 1),
                                max_logit_diff=max_diff)
        kept = {k: v for k, v in result.to_dict().items() if k not in ("folder", "reused")}
        (partial / paths.GGUF_SOURCE_FILE).write_text(json.dumps(kept, indent=2) + "\n",
                                                      encoding="utf-8")
        if folder.exists():  # damaged: its record is missing or names other bytes
            shutil.rmtree(folder)
        os.rename(partial, folder)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return result


def _check_gguf_file(path: str | os.PathLike) -> Path:
    """The GGUF file as an absolute path; refuse a missing file, another kind of file, and a
    machine without the ``gguf`` package, each naming the file and the fix."""
    source = Path(path).expanduser()
    if not source.is_file():
        where = "is a folder" if source.is_dir() else "does not exist"
        raise FileNotFoundError(
            f"GGUF file {path} {where}; pass the path of a llama.cpp .gguf file (or a model "
            "folder written by model.save_pretrained, under a name that does not end in .gguf)")
    with open(source, "rb") as fh:
        magic = fh.read(len(GGUF_MAGIC))
    if magic != GGUF_MAGIC:
        raise ValueError(
            f"{path} is not a GGUF file (it does not start with the bytes 'GGUF'); pass a "
            "llama.cpp .gguf file, or the folder written by model.save_pretrained(folder) and "
            "tokenizer.save_pretrained(folder)")
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError as err:
        raise ImportError(
            f"converting the GGUF file {path} needs the gguf package, which is not installed; "
            f"install it with `.venv/bin/pip install {GGUF_PIN}` (it is in requirements.txt)"
        ) from err
    return source.resolve()


def _sha256(source: Path, progress: ProgressFn) -> str:
    digest = hashlib.sha256()
    size = max(source.stat().st_size, 1)
    done = 0
    with open(source, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            if progress is not None:
                progress("hash GGUF file", done / size)
    return digest.hexdigest()


def _remove_abandoned(root: Path) -> None:
    """Delete the partial folders of conversions whose process is gone (killed)."""
    for partial in root.glob(".*.partial-*"):
        pid = int(partial.name.rsplit("-", 1)[1])
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            shutil.rmtree(partial, ignore_errors=True)
        except PermissionError:
            pass  # alive, another user's process


def _unsupported(source: Path, detail: str) -> ValueError:
    """The error for a GGUF file transformers cannot load, with the architectures it can."""
    import transformers
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    readable = sorted(set(GGUF_SUPPORTED_ARCHITECTURES) & set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
    return ValueError(
        f"GGUF file {source}: {detail} transformers {transformers.__version__} reads these "
        f"llama.cpp architectures from GGUF as causal language models: {', '.join(readable)}. "
        "For another architecture, pass the model's Hugging Face folder (config.json and "
        "safetensors weights) to add-model instead.")


def _convert_into(source: Path, out: Path, progress: ProgressFn) -> tuple[str, float]:
    """Write the HF folder of ``source`` into ``out`` (created only once the file has loaded);
    return the model type and the largest logit difference between the folder loaded back and
    the GGUF-loaded model on the probe prompt."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .models import ModelSpec, check_load_report, load_model

    def say(fraction: float) -> None:
        if progress is not None:
            progress("convert GGUF to safetensors", fraction)

    say(0.0)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
        say(0.2)
        gguf_model, report = AutoModelForCausalLM.from_pretrained(
            source.parent, gguf_file=source.name, output_loading_info=True)
    except ValueError as err:
        if "not supported" in str(err):  # transformers' word for an architecture it lacks
            raise _unsupported(source, str(err)) from err
        raise ValueError(f"GGUF file {source} could not be read ({err}); it may be incomplete "
                         "(an interrupted download): download it again") from err
    except (KeyError, NotImplementedError) as err:
        raise _unsupported(source, f"transformers cannot load it as a causal language model "
                                   f"({err}).") from err
    check_load_report(gguf_model, report, str(source))
    say(0.7)
    probe = tokenizer(_PROBE, return_tensors="pt")
    with torch.no_grad():
        expected = gguf_model(**probe).logits
    # A fresh model of the same class from the config without the quantization marker, holding
    # the same (already dequantized) tensors: this one save_pretrained writes as plain weights.
    config = copy.deepcopy(gguf_model.config)
    del config.quantization_config
    model, report = type(gguf_model).from_pretrained(
        None, config=config, state_dict=gguf_model.state_dict(), output_loading_info=True)
    check_load_report(model, report, str(source))
    model.generation_config = gguf_model.generation_config
    dtype = str(model.dtype).removeprefix("torch.")
    out.parent.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    del model, gguf_model
    say(0.9)
    converted = load_model(ModelSpec(path=str(out), dtype=dtype, device="cpu"))
    ids = converted.tokenizer(_PROBE, return_tensors="pt")["input_ids"]
    if not torch.equal(ids, probe["input_ids"]) or (
            converted.tokenizer.chat_template != tokenizer.chat_template):
        raise ValueError(f"GGUF file {source}: the tokenizer saved from it gives other token ids "
                         "or another chat template than the GGUF file's own; transformers "
                         f"{transformers.__version__} cannot convert its tokenizer faithfully")
    with torch.no_grad():
        max_diff = float((converted.model(**probe).logits - expected).abs().max())
    if not max_diff <= LOGIT_TOLERANCE:
        raise ValueError(f"GGUF file {source}: the converted model's logits differ from the "
                         f"GGUF-loaded model's by {max_diff:.3g} (tolerance {LOGIT_TOLERANCE}); "
                         "transformers cannot convert this file faithfully")
    say(1.0)
    return str(config.model_type), max_diff
