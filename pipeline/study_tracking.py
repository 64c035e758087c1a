"""A study in MLflow: the parent run every worker shares, each trial's nested run, the summary
logged on the parent after each worker, and the registration of the best trial's model.

    study  <->  parent run    tags pipeline.step=tune, pipeline.study_name, pipeline.study_storage
    trial  <->  nested run    tags pipeline.trial_number, pipeline.trial_state; the trial keeps the
                              run id in its user attr `mlflow_run_id`
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import os
import random
import socket
import time
import warnings
from collections.abc import Callable

import mlflow
import numpy as np
import optuna
from mlflow.entities import RunTag
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from pipeline import registry, tracking
from pipeline.compare import load_scored_images
from pipeline.config import TuneConfig
from pipeline.data.store import MANIFEST, read_manifest
from pipeline.errors import PipelineError
from pipeline.references import dataset_uri
from pipeline.stats import compare_to_best
from pipeline.study_storage import MAX_RETRIES, storage_identity

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


# --- the summary after each worker ----------------------------------------------------------


def log_summary(study: optuna.Study, cfg: TuneConfig, counts: dict[str, int], log: Callable[[str], None]) -> None:
    """On the active (parent) run: trial counts (by state), best value and params, the trials table and plots."""
    finished = counts["complete"] + counts["pruned"]
    tracking.log_metrics({f"trials_{k}": counts[k] for k in ("complete", "pruned", "fail")}, step=finished)
    best = study.best_trial if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) else None
    if best is not None:
        tracking.log_metrics(
            {f"best_{cfg.metric}": best.value, **{f"best_{k}": v for k, v in best.params.items()}}, step=finished
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
                "value": best.value,
                "metric": cfg.metric,
                "params": best.params,
                "run_id": best.user_attrs.get(ATTR_RUN_ID),
            },
            "study/best_trial.json",
        )
    df = study.trials_dataframe()
    mlflow.log_text(df.to_csv(index=False), "study/trials.csv")
    log_plots(study, log)
    tracking.set_note(describe_study(cfg, counts, best, best_vs_runner_up(study, cfg)))


def format_params(params: dict, sep: str = " ") -> str:
    """Trial hyperparameters for people: floats to 3 significant digits."""
    return sep.join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def describe_study(cfg: TuneConfig, counts: dict[str, int], best: FrozenTrial | None, versus: str = "") -> str:
    """The parent run's description in the UI: how far the study got, its best trial so far and
    `versus` (best_vs_runner_up's sentence)."""
    text = (
        f"Optuna study `{cfg.study_name}`, {cfg.direction}s {cfg.metric}: {counts['complete']} complete, "
        f"{counts['pruned']} pruned, {counts['fail']} failed of n_trials={cfg.n_trials}; each trial's run is nested "
        "below."
    )
    if best is not None:
        text += (
            f"\n\nBest: trial {best.number}, {cfg.metric}={best.value:.4f} ({format_params(best.params, ', ')}), "
            f"run `{best.user_attrs.get(ATTR_RUN_ID, '')}`."
        )
        text += f" {versus}" if versus else ""
    return text + "\n\nThe trials table and Optuna's plots are under `study/`."


def best_vs_runner_up(study: optuna.Study, cfg: TuneConfig) -> str:
    """Whether the best complete trial can be told apart from the runner-up on the validation split
    (the images both were scored on): stats.compare_to_best on their val predictions; "" when
    there is no runner-up or no predictions to compare."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)) if t.value is not None]
    ranked = sorted(complete, key=lambda t: t.value, reverse=cfg.direction == "maximize")
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
    tags = {
        TAG_STUDY: cfg.study_name,
        TAG_TRIAL: str(best.number),
        cfg.metric: f"{best.value:.6g}",
        **{k: f"{v:.6g}" for k, v in test.items()},
    }
    version = registry.register_run_model(run_id, name, registry.describe_run(run_id, test, len(images)), tags)
    log(
        f"tune: registered trial {best.number} as {name} version {version} (test macro-F1 "
        f"{test['test_f1_macro']:.4f}); "
        + registry.promote(name, version)
    )
    return version
