"""Studies on database storages with several workers: exactly n_trials finish, and a worker killed
with SIGKILL mid-trial loses nothing (heartbeat -> FAIL -> retry from its checkpoint, its MLflow
run ended FAILED). On SQLite always; on PostgreSQL with an `mlflow server` when one is reachable
(.ci/run starts one; PIPELINE_TEST_POSTGRES names it)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import mlflow
import optuna
import pytest
from mlflow.tracking import MlflowClient
from optuna.trial import TrialState

from pipeline.study.tracking import ATTR_RUN_ID, TAG_STATE, TAG_STUDY, TAG_TRIAL, TAG_WORKER
from pipeline.study.trial_accounting import ATTR_SURPLUS
from tests.conftest import subprocess_env

ROOT = Path(__file__).resolve().parent.parent
POSTGRES = os.environ.get("PIPELINE_TEST_POSTGRES", "postgresql://pipeline:pipeline@127.0.0.1:5432/pipeline")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _tune_cmd(digits: dict, storage: str, study: str, n_trials: int, epochs: int, *extra: str) -> list[str]:
    return [sys.executable, "-m", "steps.tune", "--data", digits["data"], "--pretrained", digits["pretrained"],
            "--study-name", study, "--storage", storage, "--n-trials", str(n_trials), "--epochs", str(epochs),
            "--heartbeat", "1", "--pruner", "none", "--sampler", "random", "--batch-sizes", "32", "--frozen-min", "4",
            "--augment", "none", "--precision", "fp32", "--device", "cpu", *extra]


def _env(tracking_uri: str, experiment: str) -> dict:
    return subprocess_env(MLFLOW_TRACKING_URI=tracking_uri, MLFLOW_EXPERIMENT_NAME=experiment, OMP_NUM_THREADS="1",
                          MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR="false", PIPELINE_DEBUG="1")


def _start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT)


def _wait_all(procs: list[subprocess.Popen], logs: list[Path], timeout: float = 600) -> None:
    for proc, log in zip(procs, logs):
        proc.wait(timeout=timeout)
        assert proc.returncode == 0, log.read_text()[-4000:]


def _trial_with_checkpoint(client: MlflowClient, experiment_id: str, timeout: float = 300):
    """The first running trial run that has uploaded a resumable checkpoint."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for run in client.search_runs(
            [experiment_id], "tags.`pipeline.step` = 'finetune' and attributes.status = 'RUNNING'"
        ):
            if any(a.path.endswith("last.pt") for a in client.list_artifacts(run.info.run_id, "checkpoints")):
                return run
        time.sleep(0.3)
    raise AssertionError("no trial uploaded a checkpoint in time")


def _check_study_survived_the_kill(
    study: optuna.Study, client: MlflowClient, experiment_id: str, dead_run_id: str, n_trials: int
) -> None:
    """Exactly n_trials finished; the dead trial is FAIL with its run FAILED; its retry finished,
    continuing the dead run's checkpoint; every trial's run is nested under the one parent."""
    trials = study.get_trials(deepcopy=False)
    assert sum(t.state in FINISHED for t in trials) == n_trials, [t.state for t in trials]
    dead = [t for t in trials if t.state == TrialState.FAIL and not t.user_attrs.get(ATTR_SURPLUS)]
    assert len(dead) == 1 and dead[0].user_attrs[ATTR_RUN_ID] == dead_run_id
    (retry,) = [t for t in trials if t.system_attrs.get("failed_trial") == dead[0].number]
    assert retry.state == TrialState.COMPLETE and retry.params == dead[0].params

    dead_run = client.get_run(dead_run_id)
    assert dead_run.info.status == "FAILED" and dead_run.data.tags[TAG_STATE] == "FAIL"
    retry_run = client.get_run(retry.user_attrs[ATTR_RUN_ID])
    assert retry_run.info.status == "FINISHED" and retry_run.data.tags["pipeline.resumed_from"] == dead_run_id
    steps = [m.step for m in client.get_metric_history(retry_run.info.run_id, "val_f1_macro")]
    epochs = int(retry_run.data.params["epochs"])
    assert steps and steps[0] > 1 and steps[-1] == epochs, steps  # continued, not restarted
    assert not client.list_artifacts(retry_run.info.run_id, "checkpoints")  # dropped once finished

    assert not client.search_runs([experiment_id], "attributes.status = 'RUNNING'"), "a run was left RUNNING"
    (parent,) = client.search_runs([experiment_id], "tags.`pipeline.step` = 'tune'")
    assert parent.info.status == "FINISHED"
    runs = client.search_runs([experiment_id], "tags.`pipeline.step` = 'finetune'", max_results=1000)
    assert all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
    ran = {t.number for t in trials if not t.user_attrs.get(ATTR_SURPLUS)}
    assert sorted(int(r.data.tags[TAG_TRIAL]) for r in runs) == sorted(ran)


@pytest.mark.slow
def test_sigkilled_worker_trial_is_retried_from_its_checkpoint(digits, store):
    storage = f"sqlite:///{store}/optuna.db"
    experiment_id = mlflow.create_experiment("killed")  # also creates the store's tables before two processes use it
    env = _env(mlflow.get_tracking_uri(), "killed")
    cmd = _tune_cmd(digits, storage, "killed", 2, 6)
    client = MlflowClient()

    victim = _start(cmd, env, Path(store) / "victim.log")
    dead_run = _trial_with_checkpoint(client, experiment_id)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert client.get_run(dead_run.info.run_id).info.status == "RUNNING"  # nobody ended it: the worker is gone

    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    study = optuna.load_study(study_name="killed", storage=storage)
    _check_study_survived_the_kill(study, client, experiment_id, dead_run.info.run_id, 2)


# --- PostgreSQL and a tracking server -------------------------------------------------------


def _postgres_or_skip() -> str:
    psycopg = pytest.importorskip("psycopg")
    try:
        psycopg.connect(POSTGRES, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        pytest.skip(
            f"no PostgreSQL at {POSTGRES} ({str(exc).strip()}); run `.ci/postgres.sh` as root or set "
            "PIPELINE_TEST_POSTGRES"
        )
    return POSTGRES


@contextlib.contextmanager
def _database(base_url: str):
    """A throw-away database on the server of base_url; yields its URL."""
    import psycopg

    name = f"t_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(base_url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
        try:
            yield base_url.rsplit("/", 1)[0] + f"/{name}"
        finally:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@contextlib.contextmanager
def _tracking_server(backend_uri: str, artifacts: Path, log: Path):
    from tests.test_serving import _free_port, _start_server, _stop

    port = _free_port()
    proc = _start_server(
        [
            "server",
            "--backend-store-uri",
            backend_uri,
            "--artifacts-destination",
            str(artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "2",
        ],
        "/health",
        port,
        log,
    )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        _stop(proc)


@pytest.mark.slow
def test_three_workers_share_a_postgres_study_through_a_tracking_server(digits, tmp_path):
    base = _postgres_or_skip()
    with (
        _database(base) as optuna_db,
        _database(base) as mlflow_db,
        _tracking_server(mlflow_db, tmp_path / "artifacts", tmp_path / "server.log") as server,
    ):
        client = MlflowClient(tracking_uri=server)
        experiment_id = client.create_experiment("scale-out")
        env = _env(server, "scale-out")

        # Three workers, one study: exactly n_trials finish, all nested under one parent, one registration.
        cmd = _tune_cmd(digits, optuna_db, "pg", 4, 2, "--register-as", "pg-tuned")
        logs = [tmp_path / f"w{i}.log" for i in range(3)]
        _wait_all([_start(cmd, env, log) for log in logs], logs)
        study = optuna.load_study(study_name="pg", storage=optuna_db)
        trials = study.get_trials(deepcopy=False)
        assert sum(t.state in FINISHED for t in trials) == 4, [t.state for t in trials]
        assert all(t.state in FINISHED or t.user_attrs.get(ATTR_SURPLUS) for t in trials), [t.state for t in trials]
        assert len({t.user_attrs["worker"] for t in trials if t.state in FINISHED}) >= 2, "one worker did all the work"
        (parent,) = client.search_runs([experiment_id], "tags.`pipeline.step` = 'tune'")
        runs = client.search_runs([experiment_id], "tags.`pipeline.step` = 'finetune'")
        assert len(runs) == 4 and all(r.data.tags["mlflow.parentRunId"] == parent.info.run_id for r in runs)
        assert {r.data.tags[TAG_STUDY] for r in runs} == {"pg"}
        (version,) = client.search_model_versions("name='pg-tuned'")
        assert version.run_id == study.best_trial.user_attrs[ATTR_RUN_ID]
        assert client.get_model_version_by_alias("pg-tuned", "champion").version == version.version

        # Two more trials' worth; one worker is SIGKILLed mid-trial, the other two finish the study.
        cmd = _tune_cmd(digits, optuna_db, "pg", 6, 6)
        logs = [tmp_path / f"v{i}.log" for i in range(3)]
        procs = {}
        for log in logs:
            proc = _start(cmd, env, log)
            procs[proc.pid] = (proc, log)
        dead_run = _trial_with_checkpoint(client, experiment_id)
        victim_pid = int(dead_run.data.tags[TAG_WORKER].rsplit(":", 1)[1])
        victim, _ = procs.pop(victim_pid)
        victim.send_signal(signal.SIGKILL)
        victim.wait()
        _wait_all([p for p, _ in procs.values()], [log for _, log in procs.values()])
        study = optuna.load_study(study_name="pg", storage=optuna_db)
        _check_study_survived_the_kill(study, client, experiment_id, dead_run.info.run_id, 6)
