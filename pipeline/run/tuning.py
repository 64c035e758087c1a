"""tune: an Optuna study over finetune's hyperparameters, every trial a nested MLflow run.

This module runs a worker: the search space, the objective, and the loop that starts trials. How the
study searches (sampler, pruner, checks on a continued study) is pipeline.study.setup's business,
how many trials are left pipeline.study.trial_accounting's, where the study is stored
pipeline.study.storage's; its MLflow side (the parent run all workers share, trial runs, summary,
registration) is pipeline.study.tracking's. That link is written here
rather than taken from optuna-integration's MLflowCallback, so that a trial's run *is* the
finetune run with its model, pruning ends it visibly, and parallel workers and reruns share one
parent run.

n_trials is the study's target: a rerun of a finished study adds nothing, a larger n_trials
continues it, and N workers on one storage split the work between them.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import mlflow
import optuna
import torch
from optuna.trial import TrialState

from pipeline.config import TrainConfig, TuneConfig
from pipeline.model.device import resolve_device
from pipeline.prune.pruning import prune_for_trial
from pipeline.run.runners import TrialHooks, run_train
from pipeline.study.front import front_trials, picked_trial
from pipeline.study.setup import open_study
from pipeline.study.storage import GRACE_BEATS, has_heartbeats
from pipeline.study.summary import format_params, is_registrar, log_summary, register_best
from pipeline.study.tracking import (
    ATTR_RUN_ID,
    ATTR_WORKER,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    TAG_WORKER,
    find_or_create_parent,
    log_study_dataset,
    log_study_params,
    mark_trial_run,
    parent_run,
    worker_id,
)
from pipeline.study.trial_accounting import (
    ATTR_SURPLUS,
    StopAtTarget,
    SurplusTrial,
    checkpoint_of_retried,
    refuse_surplus,
    trial_counts,
    trials_to_start,
)
from pipeline.track import tracking
from pipeline.track.references import dataset_uri, model_uri, reusing_loads
from pipeline.track.run_checkpoints import delete_checkpoints
from pipeline.train.loop import NonFiniteLossError

# A failing trial is the study's business, not the worker's: diverged training, or a batch size
# that does not fit in GPU memory. Anything else (a bad data reference...) stops the worker.
TRIAL_ERRORS = (NonFiniteLossError, torch.OutOfMemoryError)
PRUNING_RATIO = "pruning_ratio"  # a searched param that is not a TrainConfig field


# --- the search space and one trial -----------------------------------------------------------


def suggest(trial: optuna.Trial, cfg: TuneConfig) -> dict:
    params = {
        "lr": trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True),
        "batch_size": trial.suggest_categorical("batch_size", cfg.batch_size_choices),
        "weight_decay": trial.suggest_float("weight_decay", cfg.wd_min, cfg.wd_max, log=True),
        "frozen_layers": trial.suggest_int("frozen_layers", cfg.frozen_min, cfg.frozen_max),
    }
    if cfg.searches_pruning:
        params[PRUNING_RATIO] = trial.suggest_float(PRUNING_RATIO, cfg.pruning_ratio_min, cfg.pruning_ratio_max)
    return params


def trial_config(cfg: TuneConfig, params: dict) -> TrainConfig:
    """Every trial trains with the same seed, so trials differ by their hyperparameters alone."""
    return TrainConfig(
        data=cfg.data,
        pretrained=cfg.pretrained,
        arch=cfg.arch,
        epochs=cfg.epochs,
        monitor=cfg.metric,
        augment=cfg.augment,
        precision=cfg.precision,
        device=cfg.device,
        seed=cfg.seed,
        system_metrics=cfg.system_metrics,
        **{k: v for k, v in params.items() if k != PRUNING_RATIO},  # pruning happens before training, not in it
    )


def make_objective(cfg: TuneConfig, log: Callable[[str], None]):
    """The trial function; objective.started counts the trials this worker began. It returns the best
    epoch's metric, or with two objectives (metric, cost) where cost is the trial's macs or img/s."""

    def objective(trial: optuna.Trial) -> float | tuple[float, float]:
        frozen = refuse_surplus(trial, cfg.n_trials)
        objective.started += 1
        params = suggest(trial, cfg)
        start_from = checkpoint_of_retried(frozen)
        if frozen.user_attrs.get(ATTR_RUN_ID):
            trial.set_user_attr(ATTR_RUN_ID, "")  # the retried trial's run, not this one's
        trial.set_user_attr(ATTR_WORKER, worker_id())
        tags = {TAG_STUDY: cfg.study_name, TAG_TRIAL: str(trial.number), TAG_STATE: "RUNNING", TAG_WORKER: worker_id()}
        seen: dict = {}  # run_id once known; cost once prepare_net measured it
        log(f"tune: trial {trial.number} {format_params(params)}")
        state = "FAIL"
        try:
            # With heartbeats a dead worker's trial is retried from its checkpoint, so it goes up once per
            # heartbeat interval (and is deleted when the trial ends); without, it stays local (~100 MB).
            hooks = TrialHooks(on_epoch=_report_epochs(cfg, trial, seen), stopped=(optuna.TrialPruned,),
                               upload_checkpoints=heartbeats, upload_every=cfg.heartbeat, start_from=start_from,
                               input_example=False, prepare_net=_prepare_trial_net(cfg, params, seen))
            run_id = run_train(trial_config(cfg, params), "finetune", nested=True, tags=tags, hooks=hooks)
            seen["run_id"] = run_id
            values = _trial_values(cfg, trial.number, run_id, seen)
            state = "COMPLETE"
            return values
        except optuna.TrialPruned:
            state = "PRUNED"
            raise
        finally:
            mark_trial_run(trial, seen.get("run_id"), state)
            # A COMPLETE trial's run_train deleted its own checkpoint already.
            for done in (seen.get("run_id") if state != "COMPLETE" else None, start_from):
                if heartbeats and done:
                    delete_checkpoints(done)

    heartbeats = has_heartbeats(cfg.storage)
    objective.started = 0
    return objective


def _report_epochs(cfg: TuneConfig, trial: optuna.Trial, seen: dict) -> Callable[[int, dict], None]:
    """After each epoch: link the trial to its run and, with one objective, report to the pruner
    (Optuna's pruners and trial.report take one value: a two-objective trial is never pruned)."""

    def on_epoch(epoch: int, metrics: dict) -> None:
        if "run_id" not in seen:
            seen["run_id"] = mlflow.active_run().info.run_id
            trial.set_user_attr(ATTR_RUN_ID, seen["run_id"])
        if cfg.multi_objective:
            return
        value = metrics[cfg.metric]
        trial.report(value, epoch)
        # After the last epoch the work is done: the trial completes (with its model) however it compares.
        if epoch < cfg.epochs and trial.should_prune():
            raise optuna.TrialPruned(f"{cfg.metric}={value:.4f} at epoch {epoch}")

    return on_epoch


def _prepare_trial_net(cfg: TuneConfig, params: dict, seen: dict):
    """Before training: prune by the trial's pruning_ratio and measure the cost objective, logged to the
    trial's run (params, macs, and img_per_s_b64 when it is an objective); None when neither is asked."""
    if not (cfg.multi_objective or cfg.searches_pruning):
        return None
    timed = "img_per_s_b64" in cfg.objective_metrics

    def prepare(net: torch.nn.Module, image_size: int) -> None:
        ratio = params.get(PRUNING_RATIO, 0.0)
        cost = prune_for_trial(net, image_size, ratio, cfg.timing_seconds if timed else 0.0, cfg.timing_threads)
        tracking.log_params({PRUNING_RATIO: ratio})
        tracking.log_metrics(cost)
        seen["cost"] = cost

    return prepare


def _trial_values(cfg: TuneConfig, number: int, run_id: str, seen: dict) -> float | tuple[float, float]:
    value = mlflow.get_run(run_id).data.metrics.get(f"best_{cfg.metric}", math.nan)
    if not math.isfinite(value):
        raise NonFiniteLossError(f"trial {number}: best {cfg.metric} is {value}")
    if not cfg.multi_objective:
        return value
    return value, float(seen["cost"][cfg.objective_metrics[1]])


# --- the worker ---------------------------------------------------------------------------


@dataclass
class TuneResult:
    study_name: str
    parent_run_id: str
    trials_run: int  # by this worker
    counts: dict
    best_number: int | None = None
    best_value: float | None = None
    best_params: dict | None = None
    best_run_id: str | None = None
    registered_version: str | None = None
    front: list[int] = field(default_factory=list)  # two objectives: the Pareto front's trial numbers


def run_study(cfg: TuneConfig, log: Callable[[str], None] = print) -> TuneResult:
    """One worker: open (or resume) the study and its parent run, run trials until the study holds
    cfg.n_trials finished ones (or cfg.timeout passes), then log the summary and register the best."""
    resolve_device(cfg.device)  # fail fast, before any study or run exists: no GPU for device=cuda,
    dataset_uri(cfg.data)  # an unknown data run id,
    model_uri(cfg.pretrained)  # an unknown or malformed model reference
    study = open_study(cfg)
    started = datetime.datetime.now()  # Optuna's trial times are naive local times too
    parent_id = find_or_create_parent(cfg, log)
    with parent_run(parent_id):
        log_study_params(parent_id, cfg, log)
        log_study_dataset(cfg)
        # Every trial trains on the same data from the same model: load them once.
        with reusing_loads(), collecting_trial_garbage_only():
            mine = run_trials(study, cfg, log)
        log_summary(study, cfg, trial_counts(study), log)
        version = register_best(study, cfg, log) if is_registrar(study, mine, started) else None
    result = TuneResult(cfg.study_name, parent_id, mine, trial_counts(study), registered_version=version)
    best = picked_trial(study, cfg)  # the best trial; with two objectives the front member register_pick picks
    if best is not None:
        result.best_number, result.best_value, result.best_params = best.number, best.values[0], dict(best.params)
        result.best_run_id = best.user_attrs.get(ATTR_RUN_ID)
        result.front = [t.number for t in front_trials(study, cfg)] if cfg.multi_objective else []
    return result


def run_trials(study: optuna.Study, cfg: TuneConfig, log: Callable[[str], None]) -> int:
    """Start trials until the study holds cfg.n_trials finished ones; returns how many this worker ran.

    With heartbeats (SQL storages) a worker with nothing left to start waits while other workers'
    trials run: if one of those workers dies, its trial is failed after the grace period and
    re-queued, and a waiting worker runs the retry. So a study finishes while any worker lives.
    """
    objective = make_objective(cfg, log)
    heartbeats = has_heartbeats(cfg.storage)
    deadline = time.monotonic() + cfg.timeout if cfg.timeout else math.inf
    waiting_said = False
    while time.monotonic() < deadline:
        if trials_to_start(study, cfg.n_trials) > 0:
            left = deadline - time.monotonic()
            study.optimize(
                objective,
                timeout=None if math.isinf(left) else left,
                catch=(*TRIAL_ERRORS, SurplusTrial),
                callbacks=[StopAtTarget(cfg.n_trials), _log_trial(log)],
                gc_after_trial=True,
            )
            continue
        running = trial_counts(study)["running"]
        if not (heartbeats and running):
            break
        if not waiting_said:
            log(
                f"tune: waiting for {running} trial(s) running in other workers (a dead worker's trial is "
                f"retried here after {GRACE_BEATS * cfg.heartbeat} s without heartbeat)"
            )
            waiting_said = True
        time.sleep(cfg.heartbeat)
    if objective.started == 0:
        c = trial_counts(study)
        log(
            f"tune: the study holds {c['complete'] + c['pruned']} finished and {c['running']} running trial(s) "
            f"of n_trials={cfg.n_trials}: nothing left to start (raise n_trials to continue)"
        )
    return objective.started


@contextlib.contextmanager
def collecting_trial_garbage_only():
    """run_trials' gc_after_trial frees a trial's network caught in a reference cycle, with a full
    collection that walks every object the worker holds: some 600,000 with torch, MLflow and
    SQLAlchemy loaded, 0.4 s a trial on a CPU core. What is alive before the first trial (modules,
    caches) lives as long as the worker anyway, so it is frozen (gc.freeze) and each collection
    walks only what the trials made."""
    gc.collect()  # garbage from before the study goes now, not into the frozen generation
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _log_trial(log: Callable[[str], None]):
    def callback(study: optuna.Study, trial) -> None:
        if trial.state == TrialState.COMPLETE:
            costs = zip(study.user_attrs.get("objectives", [])[1:], trial.values[1:])
            cost = "".join(f" {n}={v:.4g}" for n, v in costs)
            log(f"tune: trial {trial.number} COMPLETE {study.user_attrs.get('metric')}={trial.values[0]:.4f}{cost}")
        elif trial.state == TrialState.PRUNED and trial.intermediate_values:
            epoch = max(trial.intermediate_values)
            log(f"tune: trial {trial.number} PRUNED after epoch {epoch} ({trial.intermediate_values[epoch]:.4f})")
        elif trial.user_attrs.get(ATTR_SURPLUS):
            log(f"tune: trial {trial.number} not run (another worker's trial or a queued retry took its place)")
        else:
            log(f"tune: trial {trial.number} {trial.state.name}")

    return callback


class _QuietTrialErrors(logging.Filter):
    """Optuna logs every caught trial exception as a failure with its traceback. A surplus trial is
    routine bookkeeping, reported by _log_trial in one line instead; Ctrl-C/SIGTERM keeps Optuna's
    line (which trial ended FAIL) without the traceback, and the step says the run ended KILLED."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, KeyboardInterrupt):
            record.exc_info, record.exc_text = None, None
        return not isinstance(error, SurplusTrial)


logging.getLogger("optuna.study._optimize").addFilter(_QuietTrialErrors())
