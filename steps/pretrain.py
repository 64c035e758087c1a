"""pretrain: train every layer of a network on a prepared dataset.

Writes: per-epoch metrics, config.yaml, and the `model` (MLflow PyTorch model taking uint8
(N, H, W, 3) images, with its state dict and metadata as extra files).
"""

import click

from pipeline.config import TrainConfig
from pipeline.workflow import run_train
from steps._cli import config_options, handle_errors


@click.command()
@config_options(TrainConfig, exclude=("pretrained", "frozen_layers"))
@handle_errors
def main(**params):
    run_id = run_train(TrainConfig(**params), "pretrain")
    click.echo(f"pretrain run: {run_id}")


if __name__ == "__main__":
    main()
