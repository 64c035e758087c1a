"""main: prepare_data -> pretrain -> finetune -> evaluate under one parent run.

Reuses any FINISHED step run whose parameters, upstream run ids and code version match, and
prints which steps it reused. With --register-as, registers the fine-tuned model with its test metrics.
"""

import click

from pipeline.run.chain import MainConfig, run_main
from steps._cli import config_options, handle_errors


@click.command()
@config_options(MainConfig)
@handle_errors
def main(**params):
    run_main(MainConfig(**params).to_chain(), log=click.echo)


if __name__ == "__main__":
    main()
