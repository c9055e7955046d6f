"""run: a training run.

    config.py      TrainConfig, the presets, ONE table of constraints, the engine a run picks
    train.py       the training loop (fit, run_epoch)
    api.py         parnn from Python: train on arrays, load a model file (Model: predict,
                   predict_proba, score, save); run_training, the one path `parnn train` takes too
    arrays.py      arrays a caller hands in: inputs checked, labels encoded, the validation split
    checkpoint.py  checkpoint files: write, read back checked, load the newest usable one
    resume.py      the resume policy: what a resumed run keeps, the checkpoint's record of its data
    outputs.py     what a run saves (model file, history, plot)
    session.py     a run as `parnn train` starts or resumes it, from typed options to saved files
    rundir.py      a run's directories while it runs: the lock, stale temporaries, no replacing
    memory.py      the memory a run will need, checked before anything big is allocated

Imports core, engines and the file modules (data, io, plots, ...); never a shell or the CLI.
"""
