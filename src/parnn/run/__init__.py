"""run: a training run. Config and presets (one table of constraints), the training loop,
checkpoints and the resume policy, what a run saves.

Imports core, engines and the file modules (data, io, plots, ...); never a shell or the CLI.
"""
