"""tune: an Optuna study over finetune's hyperparameters, every trial a nested MLflow run.

This module runs a worker: sampler, pruner, search space, the objective, and how many trials are
left. Where the study is stored is study_storage's business; its MLflow side (the parent run all
workers share, trial runs, summary, registration) is study_tracking's. That link is written here
rather than taken from optuna-integration's MLflowCallback, so that a trial's run *is* the
finetune run with its model, pruning ends it visibly, and parallel workers and reruns share one
parent run.

n_trials is the study's target, not a per-worker count: a worker starts no trial once the study
holds n_trials finished (COMPLETE or PRUNED) trials, counting those other workers are running,
so a rerun of a finished study adds nothing, a larger n_trials continues it, and N workers on
one storage split the work between them.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
import numpy as np
import optuna
import torch
from optuna.samplers import BaseSampler
from optuna.trial import FrozenTrial, TrialState

from pipeline.config import TrainConfig, TuneConfig
from pipeline.device import resolve_device
from pipeline.errors import PipelineError
from pipeline.references import dataset_uri, model_uri, reusing_loads
from pipeline.run_checkpoints import delete_checkpoints, has_checkpoint
from pipeline.runners import TrialHooks, run_train
from pipeline.study_storage import GRACE_BEATS, has_heartbeats, open_storage, storage_identity
from pipeline.study_tracking import (
    ATTR_RUN_ID,
    ATTR_WORKER,
    TAG_STATE,
    TAG_STUDY,
    TAG_TRIAL,
    TAG_WORKER,
    find_or_create_parent,
    format_params,
    is_registrar,
    log_study_dataset,
    log_study_params,
    log_summary,
    mark_trial_run,
    on_stale_trial,
    parent_run,
    register_best,
    worker_id,
)
from pipeline.train import NonFiniteLossError

# A failing trial is the study's business, not the worker's: diverged training, or a batch size
# that does not fit in GPU memory. Anything else (a bad data reference...) stops the worker.
TRIAL_ERRORS = (NonFiniteLossError, torch.OutOfMemoryError)
ATTR_SURPLUS = "surplus"


# --- sampler, pruner, study ---------------------------------------------------------------

def trial_seed(seed: int, number: int) -> int:
    """A sampler seed for trial `number`, independent of which worker runs it."""
    return int(np.random.SeedSequence([seed, number]).generate_state(1)[0])


class TrialSeededSampler(BaseSampler):
    """Runs a fresh inner sampler seeded with (seed, trial number) for every trial.

    Parallel workers given the same seed would otherwise draw the same hyperparameters; seeding
    per trial keeps them apart while a single worker stays reproducible.
    """

    def __init__(self, make: Callable[[int], BaseSampler], seed: int):
        self._make, self._seed = make, seed
        self._inner = make(seed)

    def before_trial(self, study, trial) -> None:
        self._inner = self._make(trial_seed(self._seed, trial.number))
        self._inner.before_trial(study, trial)

    def infer_relative_search_space(self, study, trial):
        return self._inner.infer_relative_search_space(study, trial)

    def sample_relative(self, study, trial, search_space):
        return self._inner.sample_relative(study, trial, search_space)

    def sample_independent(self, study, trial, param_name, param_distribution):
        return self._inner.sample_independent(study, trial, param_name, param_distribution)

    def after_trial(self, study, trial, state, values) -> None:
        self._inner.after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


def create_sampler(cfg: TuneConfig) -> BaseSampler:
    if cfg.sampler == "random":
        return TrialSeededSampler(lambda s: optuna.samplers.RandomSampler(seed=s), cfg.seed)
    startup = cfg.startup_trials
    # constant_liar: a running trial counts as a bad result, so parallel workers spread out.
    return TrialSeededSampler(
        lambda s: optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True, seed=s), cfg.seed
    )


def create_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        # Prune a trial whose epoch-k value is worse than the median of earlier trials at epoch k.
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=0)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig) -> optuna.Study:
    """Create the study, or load it (a rerun, another worker) after checking it optimizes cfg.metric."""
    storage = open_storage(cfg.storage, cfg.heartbeat, on_stale_trial)
    study = optuna.create_study(
        storage=storage,
        study_name=cfg.study_name,
        direction=cfg.direction,
        sampler=create_sampler(cfg),
        pruner=create_pruner(cfg),
        load_if_exists=True,
    )
    metric = study.user_attrs.get("metric")
    if metric is None:
        study.set_user_attr("metric", cfg.metric)
    elif metric != cfg.metric:
        raise PipelineError(
            f"study {cfg.study_name!r} in {storage_identity(cfg.storage)} optimizes {metric}, not metric={cfg.metric}; "
            f"pass metric={metric} to continue it, or pick a new study_name"
        )
    _check_batch_sizes(study, cfg)
    if study.direction.name.lower() != cfg.direction:
        raise PipelineError(
            f"study {cfg.study_name!r} was created to {study.direction.name.lower()}; pick a new study_name"
        )
    # Other workers judge this worker's trials dead by the heartbeat they use: all must use one.
    heartbeat = study.user_attrs.get("heartbeat")
    if heartbeat is None:
        study.set_user_attr("heartbeat", cfg.heartbeat)
    elif heartbeat != cfg.heartbeat:
        raise PipelineError(
            f"study {cfg.study_name!r} runs with heartbeat={heartbeat}, not {cfg.heartbeat}; "
            f"pass heartbeat={heartbeat} (every worker of a study must use the same)"
        )
    return study


def _check_batch_sizes(study: optuna.Study, cfg: TuneConfig) -> None:
    """Optuna cannot change a categorical parameter's choices within a study (the float and int ranges
    may change): refuse other batch_sizes here rather than fail every trial with Optuna's ValueError."""
    space = next(
        (t.distributions["batch_size"] for t in study.get_trials(deepcopy=False) if "batch_size" in t.distributions),
        None,
    )
    if space is not None and list(space.choices) != cfg.batch_size_choices:
        have = ",".join(str(c) for c in space.choices)
        raise PipelineError(
            f"study {cfg.study_name!r} draws batch_size from {have}, not batch_sizes={cfg.batch_sizes}; "
            f"pass batch_sizes={have} to continue it (Optuna cannot change a study's choices), or pick a new study_name"
        )


# --- the search space and one trial -----------------------------------------------------------


def suggest(trial: optuna.Trial, cfg: TuneConfig) -> dict:
    return {
        "lr": trial.suggest_float("lr", cfg.lr_min, cfg.lr_max, log=True),
        "batch_size": trial.suggest_categorical("batch_size", cfg.batch_size_choices),
        "weight_decay": trial.suggest_float("weight_decay", cfg.wd_min, cfg.wd_max, log=True),
        "frozen_layers": trial.suggest_int("frozen_layers", cfg.frozen_min, cfg.frozen_max),
    }


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
        **params,
    )


def make_objective(cfg: TuneConfig, log: Callable[[str], None]):
    """The trial function; objective.started counts the trials this worker began."""

    def objective(trial: optuna.Trial) -> float:
        trials = trial.study.get_trials(deepcopy=False)
        (frozen,) = [t for t in trials if t.number == trial.number]
        if is_surplus(trials, trial.number, cfg.n_trials):
            # Another worker started a trial in the same instant; this one would overshoot n_trials.
            trial.set_user_attr(ATTR_SURPLUS, True)
            trial.study.stop()
            raise SurplusTrial(
                f"trial {trial.number} not run: the study already has n_trials={cfg.n_trials} finished or running"
            )
        if _is_fresh(frozen) and any(t.state == TrialState.WAITING for t in trials):
            # A retry (or enqueued trial) was queued while this one was being created: it goes first.
            trial.set_user_attr(ATTR_SURPLUS, True)
            raise SurplusTrial(f"trial {trial.number} not run: a queued trial takes its place")
        objective.started += 1
        params = suggest(trial, cfg)
        start_from = _checkpoint_of_retried(frozen)
        if frozen.user_attrs.get(ATTR_RUN_ID):
            trial.set_user_attr(ATTR_RUN_ID, "")  # the retried trial's run, not this one's
        trial.set_user_attr(ATTR_WORKER, worker_id())
        tags = {TAG_STUDY: cfg.study_name, TAG_TRIAL: str(trial.number), TAG_STATE: "RUNNING", TAG_WORKER: worker_id()}
        seen: dict[str, str] = {}

        def on_epoch(epoch: int, metrics: dict) -> None:
            if not seen:
                seen["run_id"] = mlflow.active_run().info.run_id
                trial.set_user_attr(ATTR_RUN_ID, seen["run_id"])
            value = metrics[cfg.metric]
            trial.report(value, epoch)
            # After the last epoch the work is done: the trial completes (with its model) however it compares.
            if epoch < cfg.epochs and trial.should_prune():
                raise optuna.TrialPruned(f"{cfg.metric}={value:.4f} at epoch {epoch}")

        log(f"tune: trial {trial.number} {format_params(params)}")
        state = "FAIL"
        try:
            # With heartbeats a dead worker's trial is retried from its checkpoint, so it goes up once per
            # heartbeat interval (and is deleted when the trial ends); without, it stays local (~100 MB).
            hooks = TrialHooks(on_epoch=on_epoch, stopped=(optuna.TrialPruned,), upload_checkpoints=heartbeats,
                               upload_every=cfg.heartbeat, start_from=start_from, input_example=False)
            run_id = run_train(trial_config(cfg, params), "finetune", nested=True, tags=tags, hooks=hooks)
            seen["run_id"] = run_id
            value = mlflow.get_run(run_id).data.metrics.get(f"best_{cfg.metric}", math.nan)
            if not math.isfinite(value):
                raise NonFiniteLossError(f"trial {trial.number}: best {cfg.metric} is {value}")
            state = "COMPLETE"
            return value
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


class SurplusTrial(Exception):
    """A trial created past n_trials by a race between workers: ended FAIL, marked surplus, not run."""


def is_surplus(trials: list[FrozenTrial], number: int, target: int) -> bool:
    """Whether `target` trials numbered below `number` are already finished or running. Trial
    numbers are handed out by the storage one at a time, so of two workers racing for the last slot
    exactly one sees the other's trial ahead of its own."""
    ahead = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)
    return sum(t.number < number and t.state in ahead for t in trials) >= target


def _is_fresh(trial: FrozenTrial) -> bool:
    """Created by this ask(), not popped from the queue (enqueued by a user, or a retry)."""
    return "fixed_params" not in trial.system_attrs and "failed_trial" not in trial.system_attrs


def _checkpoint_of_retried(trial: FrozenTrial) -> str:
    """For the retry of a dead worker's trial: the dead trial's run (its user attrs were copied to
    the retry), if it left a checkpoint."""
    if trial.system_attrs.get("failed_trial") is None:  # set by RetryHeartbeatStaleTrialCallback
        return ""
    run_id = trial.user_attrs.get(ATTR_RUN_ID, "")
    return run_id if run_id and has_checkpoint(run_id) else ""


# --- how many trials are left -------------------------------------------------------------


def trial_counts(study: optuna.Study) -> dict[str, int]:
    """Trials by state; FAIL trials that were never run (surplus of a race) are counted apart."""
    counts = {s.name.lower(): 0 for s in TrialState} | {"surplus": 0}
    for t in study.get_trials(deepcopy=False):
        surplus = t.state == TrialState.FAIL and t.user_attrs.get(ATTR_SURPLUS)
        counts["surplus" if surplus else t.state.name.lower()] += 1
    return counts


def trials_to_start(study: optuna.Study, target: int) -> int:
    """Trials still to start so the study reaches `target` finished ones, counting running ones
    (other workers') as on their way. Trials of dead workers count until marked FAIL: by the
    heartbeat on SQL storages, never on journal files (raise n_trials to make up for them)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # a no-op without heartbeats
    counts = trial_counts(study)
    return target - counts["complete"] - counts["pruned"] - counts["running"]


class StopAtTarget:
    """optimize() callback: after each trial, stop this worker when nothing is left to start."""

    def __init__(self, target: int):
        self.target = target

    def __call__(self, study: optuna.Study, trial) -> None:
        if trials_to_start(study, self.target) <= 0:
            study.stop()


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
    if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        best = study.best_trial
        result.best_number, result.best_value, result.best_params = best.number, best.value, dict(best.params)
        result.best_run_id = best.user_attrs.get(ATTR_RUN_ID)
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
            log(f"tune: trial {trial.number} COMPLETE {study.user_attrs.get('metric')}={trial.value:.4f}")
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
