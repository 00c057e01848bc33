"""LoRA adapters as outputs: extracting one from a fine-tune (:mod:`.extract`) and merging
several adapters of one base into one, in adapter space (:mod:`.combine`).

Adapters as *inputs* are a view of their base (:mod:`merge_cli.io.adapters`) and merge like
any model."""
