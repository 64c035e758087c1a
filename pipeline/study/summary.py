"""What a tune worker logs on the study's parent run after its trials: trial counts, the best trial,
the trials table and Optuna's plots, whether the best can be told from the runner-up, and the
registration of the best trial's model (by one worker only).
"""

from __future__ import annotations

import datetime
from collections.abc import Callable

import mlflow
import numpy as np
import optuna
from mlflow.tracking import MlflowClient
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import TuneConfig
from pipeline.evaluate.stats import compare_to_best
from pipeline.pareto import PICK_BEST
from pipeline.study.front import describe_front, log_front, log_study_figure, picked_trial
from pipeline.study.tracking import ATTR_RUN_ID, ATTR_WORKER, TAG_STUDY, TAG_TRIAL, worker_id
from pipeline.track import registry, tracking
from pipeline.track.evaluation_logging import load_scored_images


def log_summary(study: optuna.Study, cfg: TuneConfig, counts: dict[str, int], log: Callable[[str], None]) -> None:
    """On the active (parent) run: trial counts (by state), best value and params, the trials table and plots;
    with two objectives also the Pareto front (pipeline.study.front), "best" being the front's best metric."""
    finished = counts["complete"] + counts["pruned"]
    tracking.log_metrics({f"trials_{k}": counts[k] for k in ("complete", "pruned", "fail")}, step=finished)
    best = picked_trial(study, cfg, PICK_BEST)
    if best is not None:
        _log_best(best, cfg, finished)
    df = study.trials_dataframe()
    mlflow.log_text(df.to_csv(index=False), "study/trials.csv")
    log_plots(study, log, cfg)
    note = describe_study(cfg, counts, best, best_vs_runner_up(study, cfg))
    if cfg.multi_objective:
        front, picked = log_front(study, cfg, log)
        note += describe_front(front, cfg, picked)
    tracking.set_note(note)


def _log_best(best: FrozenTrial, cfg: TuneConfig, finished: int) -> None:
    tracking.log_metrics(
        {f"best_{cfg.metric}": best.values[0], **{f"best_{k}": v for k, v in best.params.items()}}, step=finished
    )
    mlflow.set_tags(
        {
            "pipeline.best_trial_number": str(best.number),
            "pipeline.best_run_id": best.user_attrs.get(ATTR_RUN_ID, ""),
        }
    )
    mlflow.log_dict(
        {
            "number": best.number,
            "value": best.values[0],
            "metric": cfg.metric,
            "params": best.params,
            "run_id": best.user_attrs.get(ATTR_RUN_ID),
        },
        "study/best_trial.json",
    )


def format_params(params: dict, sep: str = " ") -> str:
    """Trial hyperparameters for people: floats to 3 significant digits."""
    return sep.join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def describe_study(cfg: TuneConfig, counts: dict[str, int], best: FrozenTrial | None, versus: str = "") -> str:
    """The parent run's description in the UI: how far the study got, its best trial so far and
    `versus` (best_vs_runner_up's sentence)."""
    goal = " and ".join(f"{d}s {m}" for d, m in zip(cfg.directions, cfg.objective_metrics))
    text = (
        f"Optuna study `{cfg.study_name}`, {goal}: {counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['fail']} failed of n_trials={cfg.n_trials}; each trial's run is nested "
        "below."
    )
    if best is not None:
        text += (
            f"\n\nBest: trial {best.number}, {cfg.metric}={best.values[0]:.4f} ({format_params(best.params, ', ')}), "
            f"run `{best.user_attrs.get(ATTR_RUN_ID, '')}`."
        )
        text += f" {versus}" if versus else ""
    return text + "\n\nThe trials table and Optuna's plots are under `study/`."


def best_vs_runner_up(study: optuna.Study, cfg: TuneConfig) -> str:
    """Whether the best complete trial can be told apart from the runner-up on the validation split
    (the images both were scored on): stats.compare_to_best on their val predictions; "" when
    there is no runner-up or no predictions to compare."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.values]
    ranked = sorted(complete, key=lambda t: t.values[0], reverse=cfg.direction == "maximize")
    if len(ranked) < 2:
        return ""
    (best, second), runs = ranked[:2], [t.user_attrs.get(ATTR_RUN_ID) for t in ranked[:2]]
    scored = [load_scored_images(run_id, "val") if run_id else None for run_id in runs]
    if any(s is None for s in scored):
        return ""
    a, b = scored
    if (a.digest, a.split) != (b.digest, b.split) or not np.array_equal(a.y_true, b.y_true):
        return f"Trials {best.number} and {second.number} were validated on different images; they cannot be paired."
    num_classes = max(a.num_classes, b.num_classes)
    tests = compare_to_best(a.y_true, {"best": a.y_pred, "second": b.y_pred}, num_classes, best="best")
    row = tests.loc["second"]
    verdict = ("cannot be told apart from" if row.indistinguishable else "differs from")
    return (f"On the validation split ({len(a.y_true)} images) it {verdict} the runner-up, trial {second.number} "
            f"(McNemar p={row.p_mcnemar:.3g}, paired bootstrap macro-F1 p={row.p_f1_macro:.3g}; 5% level).")


PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


def log_plots(study: optuna.Study, log: Callable[[str], None], cfg: TuneConfig | None = None) -> None:
    """Optuna's matplotlib plots as PNG artifacts; a plot that cannot be drawn is skipped, never fatal.
    With two objectives they show the metric (Optuna needs a target), and trials report no epochs."""
    from optuna.visualization import matplotlib as ovm

    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    multi = cfg is not None and cfg.multi_objective
    target = {"target": lambda t: t.values[0], "target_name": cfg.metric} if multi else {}
    for name, fn in PLOTS.items():
        if (name == "param_importances" and n_complete < 2) or (multi and name == "intermediate_values"):
            continue  # needs two complete trials; two-objective trials report no intermediate values
        log_study_figure(name, lambda: getattr(ovm, fn)(study, **target), log)


def is_registrar(study: optuna.Study, ran: int, started: datetime.datetime) -> bool:
    """Whether this worker registers the study's best model: the one that finished the study's last
    trial, or, for a rerun of a finished study, a worker that ran none while no trial ran or ended
    since it `started`. Workers ending together would otherwise register concurrently, which MLflow's
    registry does not survive (duplicate tags)."""
    finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    last = max(finished, key=lambda t: t.datetime_complete, default=None)
    if ran == 0:
        running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
        return not running and (last is None or last.datetime_complete < started)
    return last is not None and last.user_attrs.get(ATTR_WORKER) == worker_id()


def register_best(study: optuna.Study, cfg: TuneConfig, log: Callable[[str], None]) -> str | None:
    """Register the best trial's model under cfg.register_as when it beats the champion on cfg.metric
    (one version per run), scored on the test split first: the test metrics go to the trial's run and,
    with the data and pretrained model, into the version's description. Alias `champion` moves to it.

    With two objectives the trial is the front member cfg.register_pick picks. A pick other than `best`
    trades metric for speed on purpose, so it is not held back by a champion with a better metric."""
    best = picked_trial(study, cfg) if cfg.register_as else None
    run_id = best.user_attrs.get(ATTR_RUN_ID) if best is not None else None
    if not run_id:
        return None
    client = MlflowClient()
    name = cfg.register_as
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        log(f"tune: trial {best.number}'s model already is {name} version {existing[0].version}")
        return existing[0].version
    if cfg.register_pick == PICK_BEST:
        held = registry.champion_holds(name, cfg.metric, best.values[0], cfg.direction == "maximize")
        if held:
            log(f"tune: {held}")
            return None
    report, images, _ = registry.evaluate_run_on_test(run_id, cfg.data, cfg.device, cfg.precision)
    test = {k: v for k, v in report.metrics.items() if k in registry.TEST_METRICS}
    tracking.log_metrics_to(run_id, test)
    tags = {
        TAG_STUDY: cfg.study_name,
        TAG_TRIAL: str(best.number),
        **{k: f"{v:.6g}" for k, v in zip(cfg.objective_metrics, best.values)},
        **({"register_pick": cfg.register_pick} if cfg.multi_objective else {}),
        **{k: f"{v:.6g}" for k, v in test.items()},
    }
    version = registry.register_run_model(run_id, name, registry.describe_run(run_id, test, len(images)), tags)
    log(
        f"tune: registered trial {best.number} as {name} version {version} (test macro-F1 "
        f"{test['test_f1_macro']:.4f}); "
        + registry.promote(name, version)
    )
    return version
