"""pretrain: train every layer of a network on a prepared dataset.

Writes: per-epoch metrics, config.yaml, checkpoints/last.pt while it runs, and the `model` (an
MLflow pyfunc taking uint8 (N, H, W, 3) images and returning class names and probabilities, with
its state dict and metadata in the model's artifacts/ folder).
"""

import click

from pipeline.config import TrainConfig
from pipeline.run.runners import run_train
from steps._cli import config_options, handle_errors


@click.command()
@config_options(TrainConfig, exclude=("pretrained", "frozen_layers"))
@handle_errors(torchrun=True)
def main(**params):
    run_id = run_train(TrainConfig(**params), "pretrain")
    if run_id:  # under torchrun only rank 0 has the run
        click.echo(f"pretrain run: {run_id}")


if __name__ == "__main__":
    main()
