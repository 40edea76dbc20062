"""The embedded demo world: a miniature of the paper's experiment, built offline.

* :mod:`.lexicon` - hand-written phrase banks (personas' voices, general topics, four domains);
* :mod:`.corpus` - deterministic source data (JSONL) from the lexicon and a seed;
* :mod:`.tokenizer` - a locally trained BPE tokenizer with a chat template;
* :mod:`.training` - pre-train the tiny Llama base model (the LoRA on top is fine-tuned with
  :func:`cinf_core.finetune.finetune_lora`);
* :mod:`.world` - ``build_world(workspace, quick=False, seed=0, progress=None)``: everything,
  registered in the workspace store.
"""
