"""The offline demo and the research runs around it: the synthetic shapes world, its small pretrained encoders,
the demo runner, the ablation experiments and the HTML report. Nothing in the core `clipcap` package imports this."""
