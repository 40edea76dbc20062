"""The demo worlds: miniatures of the paper's experiment, built offline.

The toy world (``demo``, the default):

* :mod:`.lexicon` - hand-written phrase banks (personas' voices, general topics, four domains);
* :mod:`.corpus` - deterministic source data (JSONL) from the lexicon and a seed;
* :mod:`.tokenizer` - a locally trained BPE tokenizer with a chat template;
* :mod:`.training` - pre-train the tiny Llama base model (the LoRA on top is fine-tuned with
  :func:`cinf_core.finetune.finetune_lora`);
* :mod:`.world` - ``build_world(workspace, quick=False, seed=0, progress=None)``: everything,
  registered in the workspace store.

The SmolLM2 world (``demo --world smollm2``): :mod:`.smollm2`, a real pretrained chat model made
into a world through the user commands.
"""
from pathlib import Path

WORLDS = {"toy": "the toy world (a tiny Llama pre-trained here)",
          "smollm2": "the SmolLM2-135M-Instruct world (a real pretrained chat model)"}
"""What each world is, in words (``demo --world``, the Overview)."""


def world_workspace(world: str, default: str | Path) -> Path:
    """Where a world lives by default: the toy world in the default workspace, another world in
    a sibling folder named after it (``workspace-smollm2``), so both can be kept and switched."""
    default = Path(default)
    return default if world == "toy" else default.with_name(f"{default.name}-{world}")
