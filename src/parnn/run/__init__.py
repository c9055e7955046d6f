"""run: a training run.

    config.py      TrainConfig, the presets, ONE table of constraints, the engine a run picks
    train.py       the training loop (fit, run_epoch)
    checkpoint.py  checkpoint files: write, read back checked, load the newest usable one
    resume.py      the resume policy: what a resumed run keeps, the checkpoint's record of its data
    outputs.py     what a run saves (model file, history, plot)
    session.py     a run as `parnn train` starts or resumes it, from typed options to saved files

Imports core, engines and the file modules (data, io, plots, ...); never a shell or the CLI.
"""
