"""evaluate: score a model on a dataset split or on an image folder/archive.

Writes: `<split>_accuracy`, `<split>_{precision,recall,f1}_{macro,weighted}`,
`<split>_average_precision_macro`, per-class metrics (up to 20 classes), and evaluation/ artifacts:
per-class CSV, classification report, confusion matrix (PNG and CSV), per-class precision-recall
curves (PNG) and the up to 25 most confidently misclassified images (PNG).
"""

import click

from pipeline.config import EvaluateConfig
from pipeline.run.evaluation_run import run_evaluate
from steps._cli import config_options, handle_errors


@click.command()
@config_options(EvaluateConfig)
@handle_errors
def main(**params):
    run_id = run_evaluate(EvaluateConfig(**params))
    click.echo(f"evaluate run: {run_id}")


if __name__ == "__main__":
    main()
