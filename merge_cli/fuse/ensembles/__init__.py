"""Methods that combine the models' outputs rather than their weights: output ensembles,
mixture-of-experts assembly (streaming, routers derived from prompts) and distillation of an
ensemble into one model. The ensemble's runtime module lives in
:mod:`merge_cli.task.ensemble`, so evaluation and ``merge_cli.load`` can run it."""
