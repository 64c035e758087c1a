"""prepare_data: decode a source once and log it as the `dataset` artifact.

Writes: dataset/{train,val,test}_{images,labels}.npy and dataset/manifest.json (class names,
counts per class and split, sha256 of each array), plus an MLflow dataset input.
"""

import click

from pipeline.config import PrepareConfig
from pipeline.run.runners import run_prepare
from steps._cli import config_options, handle_errors


@click.command()
@config_options(PrepareConfig)
@handle_errors
def main(**params):
    run_id = run_prepare(PrepareConfig(**params))
    click.echo(f"prepare_data run: {run_id}")


if __name__ == "__main__":
    main()
