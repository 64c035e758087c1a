"""prune: remove whole channels from a trained model (torch-pruning), fine-tune it to recover, log it.

Writes a run tagged pipeline.step=prune holding an ordinary `model` (the same pyfunc as finetune's,
usable by evaluate, serving, register_as and finetune -P pretrained=...), and before_/after_ metrics:
params, macs, size_bytes, img_per_s_b1, img_per_s_b64 (CPU), test_accuracy, test_f1_macro; plus
pruned_test_* (before recovery), macs_reduction, params_reduction, speedup_b1 and speedup_b64.
"""

import click

from pipeline.config import PruneConfig
from pipeline.prune.pruning_run import run_prune
from steps._cli import config_options, handle_errors


@click.command()
@config_options(PruneConfig)
@handle_errors
def main(**params):
    run_id = run_prune(PruneConfig(**params))
    click.echo(f"prune run: {run_id}")


if __name__ == "__main__":
    main()
