"""tune: an Optuna study over finetune's lr, batch size, weight decay and frozen depth.

Writes one parent MLflow run per study (named after it) holding one nested finetune run per
trial (params, per-epoch metrics, model; tags pipeline.trial_number and pipeline.trial_state),
and on the parent: best value and params, study/trials.csv and Optuna's plots under study/.
With register_as, the best trial's model is registered and alias `champion` follows the best.
With objectives=<metric>,macs (or img_per_s) the study has two objectives: the parent also logs the
Pareto front (study/pareto_front.csv and .png), and register_pick says which front member to register.

n_trials is the study's total: rerunning adds trials only up to it, and the same command in
several processes on one storage (a journal file on one machine; PostgreSQL across machines) adds
workers to the same study. On database storages a killed worker's trial is retried from its last
checkpoint by another worker (see --heartbeat).
"""

import click
import optuna

from pipeline.config import TuneConfig
from pipeline.run.tuning import run_study
from steps._cli import config_options, handle_errors


@click.command()
@config_options(TuneConfig)
@handle_errors
def main(**params):
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # tune prints one line per trial itself
    result = run_study(TuneConfig(**params))
    c = result.counts
    click.echo(f"study {result.study_name}: {c['complete']} complete, {c['pruned']} pruned, {c['fail']} failed "
               f"({result.trials_run} by this worker); parent run: {result.parent_run_id}")
    if result.best_number is not None:
        params = " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in result.best_params.items())
        front = ", ".join(map(str, result.front))
        which = f"Pareto front: trials {front}; picked" if front else "best trial"
        click.echo(f"{which} {result.best_number}: {result.best_value:.4f} with {params}; run: {result.best_run_id}")


if __name__ == "__main__":
    main()
