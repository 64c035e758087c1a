"""Faults of the machine around a run: a tracking server that does not answer, a full disk, Ctrl-C,
a long outage. Each must end in one line that names the problem and the fix, never a hang."""

from __future__ import annotations

import errno
import hashlib
import http.server
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import click
import mlflow
import pytest
import torch
from click.testing import CliRunner
from mlflow.exceptions import MlflowException

from pipeline.errors import PipelineError
from pipeline.model.models import create_model
from pipeline.track import preflight, run_checkpoints, tracking
from steps._cli import EXIT_INTERRUPTED, EXIT_USER_ERROR, handle_errors
from tests.conftest import PROJECT_ROOT, subprocess_env

MLFLOW = str(Path(sys.executable).parent / "mlflow")


def closed_port() -> int:
    """A port nothing listens on: bound, then released."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def plain_http_server():
    """A loopback http.server: answers every path with its own HTML 404."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


# -- the tracking server, before any work --------------------------------------------------------

def test_closed_port_stops_entry_point_tune_worker_and_main_with_one_line(tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}"
    commands = {
        "prepare_data": ["steps.prepare_data", "--source", "digits"],
        "tune": ["steps.tune", "--data", str(tmp_path), "--pretrained", str(tmp_path),
                 "--storage", f"{tmp_path}/j.log"],
        "main": ["steps.main", "--source", "digits"],
    }
    # Started together: each pays ~10 s of imports on a loaded box; the check itself is one refused connect.
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, PYTHONPATH=str(PROJECT_ROOT))
    procs = {name: subprocess.Popen([sys.executable, "-m", *argv], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True)
             for name, argv in commands.items()}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == EXIT_USER_ERROR, (name, err)
        lines = err.strip().splitlines()
        assert lines == [f"error: tracking server {uri}: connection refused (nothing listens on that port); start it "
                         "(mlflow server --host HOST --port PORT), fix MLFLOW_TRACKING_URI, or unset it to track into "
                         "sqlite:///mlflow.db here"], (name, err)
        assert "Traceback" not in err and out == ""
    assert not (tmp_path / "mlruns").exists() and not (tmp_path / "mlflow.db").exists()  # nothing started


def test_plain_http_server_is_not_an_mlflow_server(plain_http_server):
    with pytest.raises(PipelineError) as info:
        preflight.check_tracking_server(plain_http_server)
    assert str(info.value) == (f"tracking server {plain_http_server}: not an MLflow server (HTTP 404, text/html, "
                               "to /api/2.0/mlflow/experiments/get-by-name); check the host, port and path in "
                               "MLFLOW_TRACKING_URI")


def test_server_that_accepts_but_never_answers_times_out():
    with socket.socket() as listener:  # the kernel completes the handshake; nobody ever reads or replies
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        uri = f"http://127.0.0.1:{listener.getsockname()[1]}"
        with pytest.raises(PipelineError, match=r"no answer within 0\.5 s; start it"):
            preflight.check_tracking_server(uri, timeout=0.5)


def test_local_stores_are_not_probed():
    preflight.check_tracking_server("sqlite:///nowhere/mlflow.db")
    preflight.check_tracking_server("file:///nowhere/mlruns")


@pytest.mark.slow  # an MLflow server takes ~25 s to start on the 2-core box
def test_real_mlflow_server_passes_and_its_allowed_hosts_403_is_named(tmp_path):
    port = closed_port()
    server = subprocess.Popen([MLFLOW, "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
                               "--backend-store-uri", f"sqlite:///{tmp_path}/m.db",
                               "--allowed-hosts", f"localhost:{port}"],
                              env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, 120)
        preflight.check_tracking_server(f"http://localhost:{port}", timeout=10)
        with pytest.raises(PipelineError) as info:  # 127.0.0.1 is not in --allowed-hosts
            preflight.check_tracking_server(f"http://127.0.0.1:{port}", timeout=10)
        assert str(info.value).startswith(f"tracking server http://127.0.0.1:{port}: HTTP 403 (Invalid Host header")
        assert "restart it with --allowed-hosts '127.0.0.1,127.0.0.1:*'" in str(info.value)
    finally:
        server.terminate()
        server.wait(30)


def wait_for_port(port: int, limit_s: float) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                time.sleep(2)  # uvicorn accepts before the app has finished starting
                return
        time.sleep(0.5)
    pytest.fail(f"mlflow server did not listen on {port} within {limit_s} s")


# -- Ctrl-C ---------------------------------------------------------------------------------------

def interrupted_command(open_run: bool):
    @click.command()
    @handle_errors(tracking=False)
    def cmd():
        if open_run:
            with tracking.step_run("pretrain", "pretrain resnet9 lr=0.05"):
                raise KeyboardInterrupt
        raise KeyboardInterrupt
    return cmd


def last_line(text: str) -> str:
    """The command's own last line (a fresh sqlite store first logs MLflow's table creation)."""
    return text.strip().splitlines()[-1]


def test_interrupt_names_the_run_it_ended(store):
    result = CliRunner().invoke(interrupted_command(open_run=True), [])
    run = mlflow.last_active_run()
    assert result.exit_code == EXIT_INTERRUPTED
    assert run.info.status == "KILLED"
    assert last_line(result.stderr) == f"interrupted: run {run.info.run_id} (pretrain resnet9 lr=0.05) was ended KILLED"


def test_interrupt_before_any_run_says_so(store):
    CliRunner().invoke(interrupted_command(open_run=True), [])  # an earlier command's run in this process
    result = CliRunner().invoke(interrupted_command(open_run=False), [])
    assert result.exit_code == EXIT_INTERRUPTED
    assert last_line(result.stderr) == "interrupted before any run was created"


# -- OS errors on the way out ---------------------------------------------------------------------

def test_wrapped_full_disk_is_one_line_naming_the_path(tmp_path):
    target = tmp_path / "artifacts" / "model" / "state_dict.pt"
    try:  # as MLflow's artifact repositories do it: a new exception raised while handling the OSError
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "/tmp/src.pt", None, str(target))
        except OSError as exc:
            raise MlflowException("failed to log artifact") from exc
    except MlflowException as wrapped:
        line = preflight.describe_machine_error(wrapped, uri="sqlite:///x.db")
    free = preflight.format_bytes(shutil.disk_usage(tmp_path).free)
    assert line == (f"no space left on the device: {target} ({free} free there); free space there, point the "
                    "experiment's artifact location elsewhere, or set TMPDIR to a folder with room")


@pytest.mark.parametrize("code", [errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM])
def test_other_machine_errors_name_their_cause(code, tmp_path):
    err = PermissionError(code, os.strerror(code), str(tmp_path))
    line = preflight.describe_machine_error(err, uri="sqlite:///x.db")
    assert line.startswith(preflight.MACHINE_ERRNOS[code][0] + f": {tmp_path} (")


def test_bugs_keep_their_traceback_and_os_errors_do_not():
    @click.command()
    @click.argument("kind")
    @handle_errors(tracking=False)
    def cmd(kind):
        if kind == "bug":
            raise KeyError("a bug of ours")
        try:
            open("/nonexistent-dir/x", "w")  # ENOENT is not a machine fault either: a bug, keeps its traceback
        except FileNotFoundError as exc:
            raise OSError(errno.ENOSPC, "No space left on device") from exc

    bug = CliRunner().invoke(cmd, ["bug"])
    assert isinstance(bug.exception, KeyError) and bug.exit_code == 1
    full = CliRunner().invoke(cmd, ["full"])
    assert full.exit_code == EXIT_USER_ERROR
    assert last_line(full.stderr).startswith("error: no space left on the device: writing ")
    assert "Traceback" not in full.stderr
    assert f"temporary directory {tempfile.gettempdir()} (" in full.stderr


@pytest.fixture
def tiny_tmpfs(tmp_path):
    """A 2 MB tmpfs, unmounted afterwards; skipped where this user may not mount."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if shutil.which("mount") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and mount(8); the fast tests cover the message")
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(where)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"mount -t tmpfs not permitted here: {done.stderr.strip()}")
    yield where
    subprocess.run(["umount", "-l", str(where)], check=False)


@pytest.mark.slow  # two training subprocesses (~1 min each on the loaded 2-core box)
def test_full_artifact_store_fails_the_run_keeps_the_dataset_and_a_rerun_trains_afresh(tmp_path, tiny_tmpfs):
    """A run that cannot store its model is refused before training; ENOSPC met while writing anyway (the
    estimate is rough) is the same one line: test_wrapped_full_disk_is_one_line_naming_the_path."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = subprocess_env(MLFLOW_TRACKING_URI=uri, MLFLOW_EXPERIMENT_NAME="full-disk", PYTHONPATH=str(PROJECT_ROOT))
    client = mlflow.MlflowClient(uri)
    exp_id = client.create_experiment("full-disk", artifact_location=str(tiny_tmpfs))

    def step(*argv):
        return subprocess.run([sys.executable, "-m", *argv], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=600)

    prep = step("steps.prepare_data", "--source", "digits", "--image-size", "8")
    assert prep.returncode == 0, prep.stderr
    data = prep.stdout.strip().split()[-1]
    dataset = tiny_tmpfs / exp_id if (tiny_tmpfs / exp_id).exists() else tiny_tmpfs
    dataset = next(dataset.rglob("manifest.json")).parent
    before = {p.name: p.read_bytes() for p in dataset.iterdir()}

    train = ["steps.pretrain", "--data", data, "--epochs", "1", "--arch", "resnet9", "--batch-size", "64", "--augment",
             "none", "--precision", "fp32", "--device", "cpu", "--system-metrics", "false"]
    full = step(*train)  # the model (~26 MB of resnet9 weights) does not fit in what the dataset left of 2 MB
    assert full.returncode == EXIT_USER_ERROR
    error = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    # Known before the first epoch (preflight.check_free_space), so refused then, naming both figures.
    assert error and error[0].startswith(f"error: the artifact store {tiny_tmpfs}") and " free, but this run will " \
        "write about " in error[0]
    assert "Traceback" not in full.stderr
    failed = client.search_runs([exp_id], "tags.`pipeline.step` = 'pretrain'")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert "train_loss" not in failed[0].data.metrics  # no training was paid for

    assert {p.name: p.read_bytes() for p in dataset.iterdir()} == before  # the dataset is untouched...
    manifest = json.loads(before["manifest.json"])
    for name, digest in manifest.get("sha256", {}).items():  # ...and still matches its own manifest
        assert hashlib.sha256(before[name if name in before else f"{name}.npy"]).hexdigest() == digest

    subprocess.run(["mount", "-o", "remount,size=200m", str(tiny_tmpfs)], check=True)  # space freed
    again = step(*train)
    assert again.returncode == 0, again.stderr
    runs = client.search_runs([exp_id], "tags.`pipeline.step` = 'pretrain'", order_by=["start_time ASC"])
    assert [r.info.status for r in runs] == ["FAILED", "FINISHED"]  # a new run, trained afresh
    assert runs[1].info.run_id != runs[0].info.run_id and runs[1].data.metrics["best_epoch"] == 1  # its own epoch


# -- free space before the expensive part --------------------------------------------------------

def test_estimate_matches_the_size_of_saved_weights():
    net = create_model("resnet9", 10)
    params = sum(p.numel() for p in net.parameters())
    buf = io.BytesIO()
    torch.save({k: v for k, v in net.state_dict().items() if v.is_floating_point()}, buf)
    weights_only = preflight.estimate_run_bytes(params, checkpoints=0)
    assert weights_only == pytest.approx(buf.tell(), rel=0.02)  # fp32 params (+ BN stats, pickle overhead)
    assert preflight.estimate_run_bytes(params, checkpoints=1, dataset_bytes=1000) == 5 * weights_only + 1000


def test_free_space_refuses_a_run_that_cannot_fit(tmp_path, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=3_000_000))
    with pytest.raises(PipelineError) as info:
        preflight.check_free_space(f"file://{tmp_path}/1/abc/artifacts", 40_000_000, temp_bytes=0)
    assert str(info.value).startswith(f"the artifact store {tmp_path} has 3.0 MB free, "
                                      "but this run will write about 40.0 MB")
    preflight.check_free_space(f"file://{tmp_path}/1/abc/artifacts", 1_000_000, temp_bytes=0)
    preflight.check_free_space("mlflow-artifacts:/1/abc/artifacts", 40_000_000, temp_bytes=0)  # remote: not known


def test_artifact_store_and_temp_dir_on_one_file_system_must_fit_together(tmp_path, monkeypatch):
    monkeypatch.setattr(preflight.tempfile, "gettempdir", lambda: str(tmp_path))
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=5_000_000))
    preflight.check_free_space(str(tmp_path), 2_000_000, temp_bytes=2_000_000)
    together = (f"artifact store {tmp_path} and temporary directory {tmp_path} \\(one file system\\) has 5.0 MB free, "
                "but this run will write about 6.0 MB")
    with pytest.raises(PipelineError, match=together):
        preflight.check_free_space(str(tmp_path), 3_000_000, temp_bytes=3_000_000)


# -- a long outage in the middle of a run --------------------------------------------------------

def test_outage_message_keeps_the_checkpoint_and_gives_the_resume_command(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_id = "0123456789abcdef0123456789abcdef"
    ckpt = preflight.kept_checkpoint_path(run_id)
    assert ckpt == str(tmp_path / ".pipeline" / "checkpoints" / run_id / run_checkpoints.LAST_CHECKPOINT)
    line = preflight.outage_message("http://mlflow:5000", "pretrain", run_id, ckpt, epoch=3)
    assert "before its first epoch ended, nothing to resume" in line  # no file there yet

    os.makedirs(os.path.dirname(ckpt))
    Path(ckpt).write_bytes(b"weights")
    line = preflight.outage_message("http://mlflow:5000", "pretrain", run_id, ckpt, epoch=3)
    assert "\n" not in line
    assert line.startswith("lost the tracking server http://mlflow:5000 for longer than MLflow retries")
    assert line.endswith(f"pretrain run {run_id} stopped after epoch 3, its checkpoint is kept at {ckpt}; once the "
                         f"server answers: mlflow artifacts log-artifact --local-file {ckpt} --run-id {run_id} "
                         "--artifact-path "
                         f"{run_checkpoints.CHECKPOINT_DIR} && python -m steps.pretrain --resume {run_id}")


def test_resume_command_puts_the_checkpoint_where_resume_reads_it(store, tmp_path):
    """The first half of the printed command, run for real: resume then finds the file where it looks."""
    run_id = mlflow.MlflowClient().create_run(mlflow.set_experiment("outage").experiment_id).info.run_id
    ckpt = tmp_path / run_checkpoints.LAST_CHECKPOINT
    ckpt.write_bytes(b"last epoch")
    upload = preflight.resume_command("pretrain", run_id, str(ckpt)).split(" && ")[0].split()
    done = subprocess.run([MLFLOW, *upload[1:]], env=subprocess_env(MLFLOW_TRACKING_URI=mlflow.get_tracking_uri()),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert run_checkpoints.has_checkpoint(run_id)


def test_lost_server_mid_run_is_one_line_not_a_traceback():
    import requests

    try:
        try:
            raise requests.exceptions.ConnectionError("Max retries exceeded with url: /api/2.0/mlflow/runs/log-batch")
        except requests.exceptions.ConnectionError:
            raise MlflowException("API request to http://mlflow:5000/api/2.0/mlflow/runs/log-batch failed")
    except MlflowException as exc:
        wrapped = exc
    line = preflight.describe_machine_error(wrapped, uri="http://mlflow:5000")
    assert line.startswith("lost the tracking server http://mlflow:5000 for longer than MLflow retries (Max retries")
    assert preflight.describe_machine_error(wrapped, uri="sqlite:///m.db") is None  # not a server's fault there
    assert preflight.is_lost_server(wrapped, "https://mlflow:5000")
    assert not preflight.is_lost_server(wrapped, "sqlite:///m.db")
    assert not preflight.is_lost_server(MlflowException("RESOURCE_DOES_NOT_EXIST"), "http://mlflow:5000")


def _tiny_dataset(store_dir) -> str:
    from pipeline.config import PrepareConfig
    from pipeline.run.runners import run_prepare

    return run_prepare(PrepareConfig(source="digits", image_size=8, classes="0,1,2", samples_per_class=20))


def test_pretrain_refuses_to_start_when_the_model_cannot_be_stored(store, monkeypatch):
    from pipeline.config import TrainConfig
    from pipeline.run.runners import run_train

    data = _tiny_dataset(store)
    monkeypatch.setattr(
        preflight.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000)
    )
    with pytest.raises(PipelineError, match=r"has 1.0 KB free, but this run will write about"):
        run_train(
            TrainConfig(data=data, arch="resnet9", epochs=1, batch_size=32, precision="fp32", device="cpu"), "pretrain"
        )
    failed = mlflow.search_runs(filter_string="tags.`pipeline.step` = 'pretrain'", output_format="list")
    assert [r.info.status for r in failed] == ["FAILED"]
    assert not failed[0].data.metrics  # refused before the first epoch


def test_lost_server_mid_run_keeps_the_checkpoint_and_the_printed_commands_resume_it(store, monkeypatch):
    """The server goes away after epoch 1 (simulated: log_metrics raises what MLflow raises once its retries
    are spent): one line naming the kept checkpoint, the run not ended; the commands printed resume it."""
    import requests

    from pipeline.config import TrainConfig
    from pipeline.run import runners
    from pipeline.run.runners import run_train

    data = _tiny_dataset(store)
    monkeypatch.chdir(store)
    real_log, calls = tracking.log_metrics, []

    def flaky_log(metrics, step=None):
        calls.append(step)
        if step == 2:
            raise MlflowException("API request failed") from requests.exceptions.ConnectionError("refused")
        real_log(metrics, step)

    monkeypatch.setattr(runners.tracking, "log_metrics", flaky_log)
    real_lost = preflight.is_lost_server
    monkeypatch.setattr(preflight, "is_lost_server", lambda exc, uri=None: real_lost(exc, "http://127.0.0.1:9"))
    cfg = TrainConfig(data=data, arch="resnet9", epochs=3, batch_size=32, precision="fp32", device="cpu")
    with pytest.raises(preflight.TrackingLost) as lost:
        run_train(cfg, "pretrain")
    message = str(lost.value)
    assert "\n" not in message and "after epoch 1" in message
    run = mlflow.search_runs(filter_string="tags.`pipeline.step` = 'pretrain'", output_format="list")[0]
    assert run.info.status == "RUNNING" and mlflow.active_run() is None
    kept = preflight.kept_checkpoint_path(run.info.run_id)
    assert os.path.isfile(kept) and kept in message
    assert preflight.resume_command("pretrain", run.info.run_id, kept) in message
    monkeypatch.setattr(runners.tracking, "log_metrics", real_log)
    # the printed command's first half (mlflow artifacts log-artifact), done through the client
    mlflow.tracking.MlflowClient().log_artifact(run.info.run_id, kept, "checkpoints")
    resumed = run_train(TrainConfig(resume=run.info.run_id), "pretrain")
    assert resumed == run.info.run_id
    assert mlflow.get_run(resumed).info.status == "FINISHED"
