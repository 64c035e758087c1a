"""transfer: what freezing buys. Pretrain on some classes, fine-tune on others at each frozen depth,
train the same network from scratch on the same few target images, and evaluate all of them, under one
parent run whose description says whether pretrained + frozen beats scratch.

Reuses any FINISHED step run whose parameters, upstream run ids and code version match, as main does.
"""

import click

from pipeline.config import TransferConfig
from pipeline.run.transfer import run_transfer
from steps._cli import config_options, handle_errors


@click.command()
@config_options(TransferConfig)
@handle_errors
def main(**params):
    run_transfer(TransferConfig(**params), log=click.echo)


if __name__ == "__main__":
    main()
