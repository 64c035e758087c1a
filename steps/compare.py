"""compare: a table of trained models, key params next to test metrics, best first.

    python -m steps.compare [--experiment NAME | --parent RUN_ID | RUN_ID ...]
                            [--sort METRIC] [--output FILE.csv|FILE.md] [--plot FILE.png]

A row is a pretrain/finetune run joined with an evaluate run that scored its model (tag
pipeline.upstream.model_run): params arch, frozen_layers, lr, batch_size, weight_decay, epochs,
optimizer; the evaluate run's metrics (summary and per-class F1); the training run's best_val_*.
Without a selection it compares MLflow's current experiment (MLFLOW_EXPERIMENT_NAME or
MLFLOW_EXPERIMENT_ID, else Default). Only FINISHED runs are taken from an experiment or a parent.
"""

import shutil

import click

from pipeline.config import CompareConfig
from pipeline.run.compare import compare, format_table
from steps._cli import config_options, handle_errors


@click.command()
@click.argument("run_ids", nargs=-1)
@config_options(CompareConfig)
@handle_errors
def main(run_ids, **params):
    cfg = CompareConfig(**{**params, "runs": " ".join([*run_ids, params["runs"]])})
    table, metric = compare(cfg)
    click.echo(format_table(table, shutil.get_terminal_size().columns))
    click.echo(f"{len(table)} row(s)" + (f", sorted by {metric}" if metric else ""))
    for what, path in (("table", cfg.output), ("plot", cfg.plot)):
        if path:
            click.echo(f"wrote {what}: {path}")


if __name__ == "__main__":
    main()
