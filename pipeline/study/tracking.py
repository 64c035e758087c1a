"""A study in MLflow: the parent run every worker shares and each trial's nested run (the summary
logged on the parent after each worker, and the registration of the best, are pipeline.study.summary's).

    study  <->  parent run    tags pipeline.step=tune, pipeline.study_name, pipeline.study_storage
    trial  <->  nested run    tags pipeline.trial_number, pipeline.trial_state; the trial keeps the
                              run id in its user attr `mlflow_run_id`
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import socket
import time
from collections.abc import Callable

import mlflow
import optuna
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial

from pipeline.config import TuneConfig
from pipeline.data.store import MANIFEST, read_manifest
from pipeline.errors import PipelineError
from pipeline.study.storage import MAX_RETRIES, storage_identity
from pipeline.track import registry, tracking
from pipeline.track.references import dataset_uri

TAG_STUDY = "pipeline.study_name"
TAG_STORAGE = "pipeline.study_storage"
TAG_STORAGE_ID = "pipeline.study_storage_id"
TAG_TRIAL = "pipeline.trial_number"
TAG_STATE = "pipeline.trial_state"
TAG_WORKER = "pipeline.tune_worker"
ATTR_RUN_ID = "mlflow_run_id"
ATTR_WORKER = "worker"


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def on_stale_trial(study: optuna.Study, trial: FrozenTrial) -> None:
    """A dead worker's trial was just marked FAIL: end its MLflow run FAILED (nothing stays RUNNING)
    and re-queue it. The copy keeps params and user attrs, so it knows the run to continue from."""
    # Re-queue first: until the copy is WAITING, another worker may start a fresh trial in its place.
    RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRIES, inherit_intermediate_values=True)(study, trial)
    # By tags, not the run id attr: a retry that died before its first epoch still carries the
    # previous (already FAILED) run's id, copied from the trial it retries.
    run_id = run_of_trial(trial.number, "attributes.status = 'RUNNING'")
    if run_id:
        client = MlflowClient()
        client.set_terminated(run_id, "FAILED")
        client.set_tag(run_id, TAG_STATE, "FAIL")
        client.set_tag(
            run_id,
            "pipeline.fail_reason",
            f"worker {trial.user_attrs.get(ATTR_WORKER, '?')} stopped sending heartbeats",
        )


def mark_trial_run(trial: optuna.Trial, run_id: str | None, state: str) -> None:
    """Tag the (ended) trial run with its final state and link it both ways."""
    run_id = run_id or run_of_trial(trial.number, f"tags.`{TAG_WORKER}` = '{worker_id()}'")
    if run_id is None:
        return  # failed before its run started
    trial.set_user_attr(ATTR_RUN_ID, run_id)
    client = MlflowClient()
    # The name this worker gave the run; another worker's (a dead worker's trial) is looked up.
    name = tracking.name_given(run_id) or client.get_run(run_id).info.run_name or "finetune"
    tags = {TAG_STATE: state, "mlflow.runName": f"trial {trial.number} {state.lower()}: {name}"}
    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])  # one call, not one per tag


def run_of_trial(number: int, condition: str) -> str | None:
    """The run of trial `number` nested under the active (the study's parent) run that meets
    `condition`, looked up by tags: for trials whose run id attr is missing or stale (a trial that
    failed before its first epoch, a dead worker's trial)."""
    parent = mlflow.active_run()
    if parent is None:
        return None
    runs = mlflow.search_runs(
        experiment_ids=[parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}' and tags.`{TAG_TRIAL}` = '{number}' and "
                      f"{condition}",
        output_format="list",
    )
    return runs[0].info.run_id if runs else None


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
    tags = {
        tracking.TAG_STEP: "tune",
        TAG_STUDY: cfg.study_name,
        TAG_STORAGE: storage,
        TAG_STORAGE_ID: storage_id,
        tracking.TAG_CODE: tracking.code_version(),
    }
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
        client.set_tag(
            launcher,
            "mlflow.note.content",
            f"This `mlflow run` worked on study {cfg.study_name}; its trials are nested under run {parent}.",
        )
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
    uri = dataset_uri(cfg.data)
    if os.path.isdir(cfg.data):
        folder = cfg.data
    else:
        try:
            folder = os.path.dirname(mlflow.artifacts.download_artifacts(artifact_uri=f"{uri.rstrip('/')}/{MANIFEST}"))
        except (MlflowException, OSError) as exc:
            raise PipelineError(
                f"no dataset manifest at {uri!r} ({type(exc).__name__}); pass a prepare_data run id or its dataset URI"
            ) from exc
    manifest = read_manifest(folder)
    if cfg.register_as:
        registry.require_test_split(manifest)  # before any trial, not after the study
    retry_once(lambda: tracking.log_dataset_input(manifest, uri, context="tuning"))


def log_study_params(run_id: str, cfg: TuneConfig, log: Callable[[str], None]) -> None:
    """MLflow params cannot change: the first worker's settings stay; a rerun with other values
    (a larger n_trials, a wider range) is recorded in tune_config.yaml and said on the console."""
    client = MlflowClient()
    have = client.get_run(run_id).data.params
    params = {k: tracking.param_text(v) for k, v in cfg.to_params().items()}
    params["storage"] = storage_identity(cfg.storage)
    # As `mlflow run` logged them: an empty value as '' (shell-quoted), the storage as typed.
    have = {k: "" if v == "''" else v for k, v in have.items()}
    if "storage" in have:
        have["storage"] = storage_identity(have["storage"])
    new = {k: v for k, v in params.items() if k not in have}
    changed = sorted(k for k, v in params.items() if k in have and not _same_param(have[k], v))
    if new:
        retry_once(lambda: tracking.log_params(new))  # it skips keys another worker logged meanwhile
    if changed:
        log(
            f"tune: the parent keeps the first run's params for {', '.join(changed)}; this worker's values are in "
            "tune_config.yaml"
        )
    tracking.log_config(params, "tune_config.yaml")


def _same_param(a: str, b: str) -> bool:
    """Equal as logged: `mlflow run` logs '-P timeout=0' as '0' where the config says 0.0."""
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        return False
