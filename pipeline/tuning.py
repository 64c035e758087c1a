"""tune: an Optuna study over finetune's hyperparameters, every trial a nested MLflow run.

The one place that talks to Optuna: storage, sampler, pruner, search space, objective, and the
link between a study and MLflow (written here rather than taken from optuna-integration's
MLflowCallback, so that a trial's run *is* the finetune run with its model, pruning ends it
visibly, and parallel workers and reruns share one parent run):

    study  <->  parent run    tags pipeline.step=tune, pipeline.study_name, pipeline.study_storage
    trial  <->  nested run    tags pipeline.trial_number, pipeline.trial_state; the trial keeps the
                              run id in its user attr `mlflow_run_id`

n_trials is the study's target, not a per-worker count: a worker starts no trial once the study
holds n_trials finished (COMPLETE or PRUNED) trials, counting those other workers are running,
so a rerun of a finished study adds nothing, a larger n_trials continues it, and N workers on
one storage split the work between them.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import logging
import math
import os
import random
import re
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import mlflow
import numpy as np
import optuna
import torch
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.samplers import BaseSampler
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipeline import registry, tracking
from pipeline.config import TrainConfig, TuneConfig
from pipeline.data.store import MANIFEST, read_manifest
from pipeline.errors import PipelineError
from pipeline.train import NonFiniteLossError, resolve_device
from pipeline.workflow import run_train

TAG_STUDY = "pipeline.study_name"
TAG_STORAGE = "pipeline.study_storage"
TAG_STORAGE_ID = "pipeline.study_storage_id"
TAG_TRIAL = "pipeline.trial_number"
TAG_STATE = "pipeline.trial_state"
TAG_WORKER = "pipeline.tune_worker"
ATTR_RUN_ID = "mlflow_run_id"
ATTR_WORKER = "worker"
# A failing trial is the study's business, not the worker's: diverged training, or a batch size
# that does not fit in GPU memory. Anything else (a bad data reference...) stops the worker.
TRIAL_ERRORS = (NonFiniteLossError, torch.OutOfMemoryError)
# SQL storages: workers send a heartbeat every cfg.heartbeat seconds; a trial silent for GRACE_BEATS
# of them (its worker was killed) is marked FAIL by the next worker that looks, its MLflow run ended
# FAILED, and a copy re-queued (up to MAX_RETRIES times) that continues from its last checkpoint.
# Journal files have no heartbeat.
GRACE_BEATS = 3
MAX_RETRIES = 2
ATTR_SURPLUS = "surplus"


# --- storage, sampler, pruner -----------------------------------------------------------------

def journal_path(storage: str) -> str | None:
    """The file of a journal storage ('journal:PATH' or a path ending .log), else None."""
    if storage.startswith("journal:"):
        return storage[len("journal:"):]
    if storage.endswith(".log") and "://" not in storage:
        return storage
    return None


def has_heartbeats(storage: str) -> bool:
    """Database storages get heartbeats (open_storage); journal files have none."""
    return journal_path(storage) is None


def storage_identity(storage: str) -> str:
    """A cwd-independent, password-free name of the storage, recorded on the parent run."""
    path = journal_path(storage)
    if path is not None:
        return "journal:" + os.path.abspath(path)
    if storage.startswith("sqlite:///") and not storage.startswith("sqlite:////"):
        rel = storage[len("sqlite:///"):]
        if rel and rel != ":memory:":
            return "sqlite:///" + os.path.abspath(rel)
    return re.sub(r"//([^:/@]+):[^@/]*@", r"//\1:***@", storage)


def open_storage(storage: str, heartbeat: int = 60) -> optuna.storages.BaseStorage:
    path = journal_path(storage)
    if path is not None:
        if not path:
            raise PipelineError("storage='journal:' names no file; use e.g. journal:optuna-journal.log")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise PipelineError(f"journal storage {path!r}: folder {parent!r} does not exist; create it or pick another path")
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(path))
    if "://" not in storage:
        raise PipelineError(
            f"storage={storage!r} is neither a database URL (sqlite:///optuna.db, postgresql://...) "
            "nor a journal file (a path ending .log, or journal:PATH)"
        )
    try:
        return _open_rdb(storage, heartbeat)
    except (ImportError, ValueError, RuntimeError) as exc:
        raise PipelineError(f"cannot open Optuna storage {storage_identity(storage)!r}: {exc}") from exc
    except Exception as exc:  # sqlalchemy's errors: bad URL, unreachable server, missing driver
        if type(exc).__module__.startswith("sqlalchemy"):
            raise PipelineError(f"cannot open Optuna storage {storage_identity(storage)!r}: {exc}") from exc
        raise


def _open_rdb(storage: str, heartbeat: int, attempts: int = 3) -> optuna.storages.RDBStorage:
    """RDBStorage, retried: workers started together on a new database all create its tables, and
    all but one fail on the duplicates (seen with three on PostgreSQL); a retry finds them made."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(storage, heartbeat_interval=heartbeat, grace_period=GRACE_BEATS * heartbeat,
                                                  heartbeat_stale_trial_callback=on_stale_trial)
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(1 + random.random())
    raise AssertionError("unreachable")


def on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A dead worker's trial was just marked FAIL: end its MLflow run FAILED (nothing stays RUNNING)
    and re-queue it. The copy keeps params and user attrs, so it knows the run to continue from."""
    # Re-queue first: until the copy is WAITING, another worker may start a fresh trial in its place.
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)(study, trial)
    # By tags, not the run id attr: a retry that died before its first epoch still carries the
    # previous (already FAILED) run's id, copied from the trial it retries.
    run_id = _run_of_trial(trial.number, "attributes.status = 'RUNNING'")
    if run_id:
        client = MlflowClient()
        client.set_terminated(run_id, "FAILED")
        client.set_tag(run_id, TAG_STATE, "FAIL")
        client.set_tag(run_id, "pipeline.fail_reason", f"worker {trial.user_attrs.get(ATTR_WORKER, '?')} stopped sending heartbeats")


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
    return TrialSeededSampler(lambda s: optuna.samplers.TPESampler(n_startup_trials=startup, constant_liar=True, seed=s), cfg.seed)


def create_pruner(cfg: TuneConfig) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        # Prune a trial whose epoch-k value is worse than the median of earlier trials at epoch k.
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.startup_trials, n_warmup_steps=0)
    if cfg.pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=cfg.epochs, reduction_factor=3)
    return optuna.pruners.NopPruner()


def open_study(cfg: TuneConfig) -> optuna.Study:
    """Create the study, or load it (a rerun, another worker) after checking it optimizes cfg.metric."""
    storage = open_storage(cfg.storage, cfg.heartbeat)
    study = optuna.create_study(
        storage=storage, study_name=cfg.study_name, direction=cfg.direction,
        sampler=create_sampler(cfg), pruner=create_pruner(cfg), load_if_exists=True,
    )
    metric = study.user_attrs.get("metric")
    if metric is None:
        study.set_user_attr("metric", cfg.metric)
    elif metric != cfg.metric:
        raise PipelineError(
            f"study {cfg.study_name!r} in {storage_identity(cfg.storage)} optimizes {metric}, not metric={cfg.metric}; "
            f"pass metric={metric} to continue it, or pick a new study_name"
        )
    if study.direction.name.lower() != cfg.direction:
        raise PipelineError(f"study {cfg.study_name!r} was created to {study.direction.name.lower()}; pick a new study_name")
    # Other workers judge this worker's trials dead by the heartbeat they use: all must use one.
    heartbeat = study.user_attrs.get("heartbeat")
    if heartbeat is None:
        study.set_user_attr("heartbeat", cfg.heartbeat)
    elif heartbeat != cfg.heartbeat:
        raise PipelineError(f"study {cfg.study_name!r} runs with heartbeat={heartbeat}, not {cfg.heartbeat}; "
                            f"pass heartbeat={heartbeat} (every worker of a study must use the same)")
    return study


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
        data=cfg.data, pretrained=cfg.pretrained, arch=cfg.arch, epochs=cfg.epochs, monitor=cfg.metric,
        augment=cfg.augment, precision=cfg.precision, device=cfg.device, seed=cfg.seed,
        system_metrics=cfg.system_metrics, **params,
    )


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def make_objective(cfg: TuneConfig, log: Callable[[str], None]):
    """The trial function; objective.started counts the trials this worker began."""

    def objective(trial: optuna.Trial) -> float:
        trials = trial.study.get_trials(deepcopy=False)
        (frozen,) = [t for t in trials if t.number == trial.number]
        if is_surplus(trials, trial.number, cfg.n_trials):
            # Another worker started a trial in the same instant; this one would overshoot n_trials.
            trial.set_user_attr(ATTR_SURPLUS, True)
            trial.study.stop()
            raise SurplusTrial(f"trial {trial.number} not run: the study already has n_trials={cfg.n_trials} finished or running")
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

        log(f"tune: trial {trial.number} " + " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()))
        state = "FAIL"
        try:
            # With heartbeats a dead worker's trial is retried from its checkpoint, so it goes up once per
            # heartbeat interval (and is deleted when the trial ends); without, it stays local (~100 MB).
            run_id = run_train(trial_config(cfg, params), "finetune", nested=True, tags=tags, on_epoch=on_epoch, stopped=(optuna.TrialPruned,),
                               upload_checkpoints=heartbeats, upload_every=cfg.heartbeat, start_from=start_from)
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
            _mark_trial_run(trial, seen.get("run_id"), state)
            for done in (seen.get("run_id"), start_from):
                if heartbeats and done:
                    tracking.delete_checkpoints(done)

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
    return run_id if run_id and tracking.has_checkpoint(run_id) else ""


def _mark_trial_run(trial: optuna.Trial, run_id: str | None, state: str) -> None:
    """Tag the (ended) trial run with its final state and link it both ways."""
    run_id = run_id or _run_of_trial(trial.number, f"tags.`{TAG_WORKER}` = '{worker_id()}'")
    if run_id is None:
        return  # failed before its run started
    trial.set_user_attr(ATTR_RUN_ID, run_id)
    client = MlflowClient()
    name = client.get_run(run_id).info.run_name or "finetune"
    client.set_tag(run_id, TAG_STATE, state)
    client.set_tag(run_id, "mlflow.runName", f"trial {trial.number} {state.lower()}: {name}")


def _run_of_trial(number: int, condition: str) -> str | None:
    """The run of trial `number` nested under the active (the study's parent) run that meets
    `condition`, looked up by tags: for trials whose run id attr is missing or stale (a trial that
    failed before its first epoch, a dead worker's trial)."""
    parent = mlflow.active_run()
    if parent is None:
        return None
    runs = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`{TAG_TRIAL}` = '{number}' and {condition}",
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


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


# --- the parent run -----------------------------------------------------------------------

def _experiment_id() -> str:
    from mlflow.tracking.fluent import _get_experiment_id

    return _get_experiment_id() or "0"


def _parent_runs(experiment_id: str, study_name: str, storage_id: str) -> list:
    return mlflow.search_runs(
        experiment_ids=[experiment_id],
        filter_string=(
            f"tags.`{tracking.TAG_STEP}` = 'tune' and tags.`{TAG_STUDY}` = '{study_name}' "
            f"and tags.`{TAG_STORAGE_ID}` = '{storage_id}'"
        ),
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )


def _first(runs: list):
    """The parent all workers agree on: the oldest, ties broken by run id."""
    return min(runs, key=lambda r: (r.info.start_time, r.info.run_id))


def find_or_create_parent(cfg: TuneConfig, log: Callable[[str], None]) -> str:
    """The study's parent run id: found by its tags (a rerun, another worker) or created.

    Under `mlflow run`, the launcher's run (MLFLOW_RUN_ID) becomes the parent of a new study;
    for an existing one it becomes a small 'tune worker' run nested under the parent.
    """
    client = MlflowClient()
    launcher = os.environ.pop("MLFLOW_RUN_ID", None)  # else nested trial runs would attach to it
    exp = client.get_run(launcher).info.experiment_id if launcher else _experiment_id()
    storage = storage_identity(cfg.storage)
    storage_id = hashlib.sha256(storage.encode()).hexdigest()[:16]
    tags = {tracking.TAG_STEP: "tune", TAG_STUDY: cfg.study_name, TAG_STORAGE: storage, TAG_STORAGE_ID: storage_id,
            tracking.TAG_CODE: tracking.code_version()}
    found = _parent_runs(exp, cfg.study_name, storage_id)
    mine = None
    if not found:
        if launcher:
            mine = launcher
            for k, v in tags.items():
                client.set_tag(mine, k, v)
        else:
            mine = client.create_run(exp, run_name=cfg.study_name, tags=tags).info.run_id
        client.set_tag(mine, "mlflow.runName", cfg.study_name)
        # Two workers starting together may both have created one: both keep the oldest.
        found = _parent_runs(exp, cfg.study_name, storage_id)
    parent = _first(found).info.run_id
    if mine and mine != parent and mine != launcher:
        client.delete_run(mine)
    if launcher and launcher != parent:
        client.set_tag(launcher, tracking.TAG_STEP, "tune_worker")
        client.set_tag(launcher, TAG_STUDY, cfg.study_name)
        client.set_tag(launcher, "mlflow.parentRunId", parent)
        client.set_tag(launcher, "mlflow.runName", f"{cfg.study_name} worker")
        client.set_tag(launcher, "mlflow.note.content", f"This `mlflow run` worked on study {cfg.study_name}; its trials are nested under run {parent}.")
    log(f"tune: study {cfg.study_name!r} in {storage}; parent run {parent}" + (" (resumed)" if mine != parent else ""))
    return parent


@contextlib.contextmanager
def parent_run(run_id: str):
    """Reattach to the parent run; several workers may hold it at once (the last to end sets its status)."""
    run = mlflow.start_run(run_id=run_id)
    with tracking.ending_run():
        yield run


def retry_once(fn: Callable[[], None]) -> None:
    """Run an MLflow write again if it lost a race with another worker (SQLite stores check, then
    insert: two workers logging the same dataset or param at once collide on a UNIQUE constraint)."""
    try:
        fn()
    except MlflowException:
        time.sleep(0.5 + random.random())
        fn()


def log_study_dataset(cfg: TuneConfig) -> None:
    """Record the dataset as an input of the parent run. Done once per worker before any trial, this
    also creates the experiment's dataset entry that every trial run's input then refers to."""
    uri = tracking.dataset_uri(cfg.data)
    if os.path.isdir(cfg.data):
        folder = cfg.data
    else:
        try:
            folder = os.path.dirname(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{MANIFEST}"))
        except (MlflowException, OSError) as exc:
            raise PipelineError(f"no dataset manifest at {uri!r} ({type(exc).__name__}); pass a prepare_data run id or its dataset URI") from exc
    manifest = read_manifest(folder)
    if cfg.register_as:
        registry.require_test_split(manifest)  # before any trial, not after the study
    retry_once(lambda: tracking.log_dataset_input(manifest, uri, context="tuning"))


def log_study_params(run_id: str, cfg: TuneConfig, log: Callable[[str], None]) -> None:
    """MLflow params cannot change: the first worker's settings stay; a rerun with other values
    (a larger n_trials, a wider range) is recorded in tune_config.yaml and said on the console."""
    client = MlflowClient()
    have = client.get_run(run_id).data.params
    params = {k: str(v) for k, v in cfg.to_params().items()}
    params["storage"] = storage_identity(cfg.storage)
    new = {k: v for k, v in params.items() if k not in have}
    changed = sorted(k for k, v in params.items() if k in have and not _same_param(have[k], v))
    if new:
        retry_once(lambda: tracking.log_params(new))  # it skips keys another worker logged meanwhile
    if changed:
        log(f"tune: the parent keeps the first run's params for {', '.join(changed)}; this worker's values are in tune_config.yaml")
    tracking.log_config(params, "tune_config.yaml")


def _same_param(a: str, b: str) -> bool:
    """Equal as logged: `mlflow run` logs '-P timeout=0' as '0' where the config says 0.0."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False


# --- the summary after each worker ----------------------------------------------------------

def log_summary(study: optuna.Study, cfg: TuneConfig, log: Callable[[str], None]) -> None:
    """On the active (parent) run: counts, best value and params, the trials table and plots."""
    counts = trial_counts(study)
    finished = counts["complete"] + counts["pruned"]
    tracking.log_metrics({f"trials_{k}": counts[k] for k in ("complete", "pruned", "fail")}, step=finished)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = study.best_trial
        tracking.log_metrics({f"best_{cfg.metric}": best.value, **{f"best_{k}": v for k, v in best.params.items()}}, step=finished)
        mlflow.set_tags({"pipeline.best_trial_number": str(best.number), "pipeline.best_run_id": best.user_attrs.get(ATTR_RUN_ID, "")})
        mlflow.log_dict({"number": best.number, "value": best.value, "metric": cfg.metric, "params": best.params,
                         "run_id": best.user_attrs.get(ATTR_RUN_ID)}, "study/best_trial.json")
    df = study.trials_dataframe()
    mlflow.log_text(df.to_csv(index=False), "study/trials.csv")
    log_plots(study, log)


PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "intermediate_values": "plot_intermediate_values",
}


def log_plots(study: optuna.Study, log: Callable[[str], None]) -> None:
    """Optuna's matplotlib plots as PNG artifacts; a plot that cannot be drawn is skipped, never fatal."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as ovm

    n_complete = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
    for name, fn in PLOTS.items():
        if name == "param_importances" and n_complete < 2:
            continue  # needs two complete trials
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # ExperimentalWarning on every call
                ax = getattr(ovm, fn)(study)
            fig = np.ravel(ax)[0].figure
            fig.set_size_inches(8, 5)
            fig.tight_layout()
            mlflow.log_figure(fig, f"study/{name}.png")
        except Exception as exc:  # a plot is a nicety: a study never fails for it
            log(f"tune: skipped the {name} plot ({type(exc).__name__}: {exc})")
        finally:
            plt.close("all")


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
    with the data and pretrained model, into the version's description. Alias `champion` moves to it."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if not cfg.register_as or not complete:
        return None
    best = study.best_trial
    run_id = best.user_attrs.get(ATTR_RUN_ID)
    if not run_id:
        return None
    client = MlflowClient()
    name = cfg.register_as
    existing = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    if existing:
        log(f"tune: trial {best.number}'s model already is {name} version {existing[0].version}")
        return existing[0].version
    held = registry.champion_holds(name, cfg.metric, best.value, cfg.direction == "maximize")
    if held:
        log(f"tune: {held}")
        return None
    report, images, _ = registry.evaluate_run_on_test(run_id, cfg.data, cfg.device, cfg.precision)
    test = {k: v for k, v in report.metrics.items() if k in registry.TEST_METRICS}
    tracking.log_metrics_to(run_id, test)
    tags = {TAG_STUDY: cfg.study_name, TAG_TRIAL: str(best.number), cfg.metric: f"{best.value:.6g}",
            **{k: f"{v:.6g}" for k, v in test.items()}}
    version = registry.register_run_model(run_id, name, registry.describe_run(run_id, test, len(images)), tags)
    log(f"tune: registered trial {best.number} as {name} version {version} (test macro-F1 {test['test_f1_macro']:.4f}); "
        + registry.promote(name, version))
    return version


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
    tracking.dataset_uri(cfg.data)  # an unknown data run id,
    tracking.model_uri(cfg.pretrained)  # an unknown or malformed model reference
    study = open_study(cfg)
    started = datetime.datetime.now()  # Optuna's trial times are naive local times too
    parent_id = find_or_create_parent(cfg, log)
    with parent_run(parent_id):
        log_study_params(parent_id, cfg, log)
        log_study_dataset(cfg)
        mine = run_trials(study, cfg, log)
        log_summary(study, cfg, log)
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
            study.optimize(objective, timeout=None if math.isinf(left) else left, catch=(*TRIAL_ERRORS, SurplusTrial),
                           callbacks=[StopAtTarget(cfg.n_trials), _log_trial(log)], gc_after_trial=True)
            continue
        running = trial_counts(study)["running"]
        if not (heartbeats and running):
            break
        if not waiting_said:
            log(f"tune: waiting for {running} trial(s) running in other workers (a dead worker's trial is "
                f"retried here after {GRACE_BEATS * cfg.heartbeat} s without heartbeat)")
            waiting_said = True
        time.sleep(cfg.heartbeat)
    if objective.started == 0:
        c = trial_counts(study)
        log(f"tune: the study holds {c['complete'] + c['pruned']} finished and {c['running']} running trial(s) "
            f"of n_trials={cfg.n_trials}: nothing left to start (raise n_trials to continue)")
    return objective.started


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


class _QuietSurplus(logging.Filter):
    """Optuna logs every caught trial exception as a failure with its traceback; a surplus trial is
    routine bookkeeping, reported by _log_trial in one line instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.exc_info and isinstance(record.exc_info[1], SurplusTrial))


logging.getLogger("optuna.study._optimize").addFilter(_QuietSurplus())
