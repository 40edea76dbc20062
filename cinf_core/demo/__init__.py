"""The embedded demo world: a miniature of the paper's experiment, built offline.

* :mod:`.lexicon` - hand-written phrase banks (personas' voices, general topics, four domains);
* :mod:`.corpus` - deterministic source data (JSONL) from the lexicon and a seed;
* :mod:`.tokenizer` - a locally trained BPE tokenizer with a chat template;
* :mod:`.training` - pre-train the tiny Llama base model, fine-tune a LoRA (``finetune_lora`` is
  what filter-and-retrain calls on filtered subsets);
* :mod:`.world` - ``build_world(workspace, quick=False, seed=0, progress=None)``: everything,
  registered in the workspace store.
"""
