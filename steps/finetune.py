"""finetune: start from a pretrained model, freeze its first k stages, train the rest.

Writes the same as pretrain; the head is re-initialised when the class set differs, and the
number of trainable parameters is logged as `trainable_params`.
"""

import click

from pipeline.config import TrainConfig
from pipeline.run.runners import run_train
from steps._cli import config_options, handle_errors

FINETUNE_DEFAULTS = {"arch": "auto", "lr": 0.01, "epochs": 5}


@click.command()
@config_options(TrainConfig, defaults=FINETUNE_DEFAULTS)
@handle_errors(torchrun=True)
def main(**params):
    run_id = run_train(TrainConfig(**params), "finetune")
    if run_id:  # under torchrun only rank 0 has the run
        click.echo(f"finetune run: {run_id}")


if __name__ == "__main__":
    main()
