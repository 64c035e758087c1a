"""Image-classification pretrain/fine-tune pipeline: the library behind steps/.

Importing this package does nothing but define things: no I/O, no downloads.

Packages, each importing only those below it (import-linter checks it, `make lint`):

    run        the step runners steps/ calls
    study      Optuna studies and their MLflow parent runs
    prune      structural pruning and the prune run
    track      everything that talks to MLflow for one run
    train      the training loop, its state, checkpoint, optimizer, EMA
    evaluate   scoring, metrics, statistics, calibration, predictions, plots
    model      the network, device and precision
    data       image sources, the dataset artifact, batches
    config     one validated dataclass per step

and three plain modules any of them may import: errors, distributed (the torchrun process world),
pareto (Pareto front and pick rule).
"""
