"""Faults of the machine around a run: checks before any work, and one-line messages when they strike.

- check_tracking_server: an http(s) tracking URI is asked once, with a short timeout, before a step
  creates a run (MLflow's own client would retry for minutes against a server that is not there).
- estimate_run_bytes / check_free_space: refuse to start when a local artifact store or the
  temporary directory clearly cannot hold what the run will write.
- describe_machine_error: the one line for an OS error (full disk, quota, read-only, permission)
  or a lost tracking server, found anywhere in an exception's chain; None for anything else (bugs
  keep their traceback).
- outage_message: what a training step says when the server stays away longer than MLflow's retry
  budget, with the commands that resume from the checkpoint it kept.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path
from urllib.parse import urlparse

import mlflow
import requests
from mlflow.utils.credentials import get_default_host_creds
from mlflow.utils.rest_utils import http_request

from pipeline.errors import PipelineError

SERVER_CHECK_TIMEOUT_S = 4.0  # one attempt, connect and read: long enough for a loaded server
# An endpoint every MLflow tracking server has; any MLflow JSON answer (even "no such experiment") will do.
SERVER_PROBE = "/api/2.0/mlflow/experiments/get-by-name?experiment_name=Default"
BYTES_PER_PARAM = 4  # fp32 weights
CHECKPOINT_FACTOR = 4  # weights + optimizer state (momentum / Adam moments) + EMA copy, roughly
KEPT_CHECKPOINTS = ".pipeline/checkpoints"  # under the working directory (git-ignored)
TMPDIR_FIX = "or set TMPDIR to a folder with room"
ELSEWHERE = "point the experiment's artifact location elsewhere, " + TMPDIR_FIX
WRITABLE = "make it writable for this user, " + ELSEWHERE
MACHINE_ERRNOS = {  # errno: (what happened, the fix)
    errno.ENOSPC: ("no space left on the device", "free space there, " + ELSEWHERE),
    errno.EDQUOT: ("disk quota exceeded", "free space within your quota, " + ELSEWHERE),
    errno.EROFS: ("read-only file system", ELSEWHERE),
    errno.EACCES: ("permission denied", WRITABLE),
    errno.EPERM: ("operation not permitted", WRITABLE),
}


# -- the tracking server -------------------------------------------------------------------------

def check_tracking_server(uri: str | None = None, timeout: float = SERVER_CHECK_TIMEOUT_S) -> None:
    """Raise a PipelineError naming the URI, what happened and the fix, unless an http(s) tracking
    URI answers as an MLflow server within `timeout` seconds. Other URIs (sqlite, file) pass."""
    uri = uri or mlflow.get_tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        return
    try:
        response = http_request(get_default_host_creds(uri), SERVER_PROBE, "GET", max_retries=0,
                                timeout=timeout, raise_on_status=False)
    except Exception as exc:  # MLflow wraps requests' errors in an MlflowException
        raise PipelineError(_unreachable_message(uri, exc, timeout)) from exc
    problem = _bad_answer(response)
    if problem:
        raise PipelineError(f"tracking server {uri}: {problem}")


def _unreachable_message(uri: str, exc: BaseException, timeout: float) -> str:
    cause = _find_in_chain(exc, (requests.exceptions.Timeout, requests.exceptions.ConnectionError))
    # Without retries urllib3's read timeout reaches us as a ConnectionError ("Read timed out").
    if isinstance(cause, requests.exceptions.Timeout) or "timed out" in str(cause).lower():
        what = f"no answer within {timeout:g} s"
    elif cause is not None and "refused" in str(cause).lower():
        what = "connection refused (nothing listens on that port)"
    else:
        what = f"cannot be reached ({_short(cause or exc)})"
    return (f"tracking server {uri}: {what}; start it (mlflow server --host HOST --port PORT), fix "
            "MLFLOW_TRACKING_URI, or unset it to track into sqlite:///mlflow.db here")


def _bad_answer(response: requests.Response) -> str | None:
    """What is wrong with the probe's answer, or None when an MLflow server gave it."""
    if response.status_code == 403 and "host" in response.text.lower():
        host = urlparse(response.url).hostname
        return (f"HTTP 403 ({response.text.strip()[:80]}); the server's --allowed-hosts does not list "
                f"{host!r}: restart it with --allowed-hosts '{host},{host}:*'")
    if response.status_code == 401:
        return "HTTP 401, the server wants credentials; set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"
    if _is_mlflow_json(response):
        return None
    kind = response.headers.get("content-type", "no content type").split(";")[0]
    return (f"not an MLflow server (HTTP {response.status_code}, {kind}, to {SERVER_PROBE.split('?')[0]}); "
            "check the host, port and path in MLFLOW_TRACKING_URI")


def _is_mlflow_json(response: requests.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return False
    return isinstance(body, dict) and ("experiment" in body or "error_code" in body)


# -- free space ----------------------------------------------------------------------------------

def estimate_run_bytes(num_params: int, checkpoints: int = 1, dataset_bytes: int = 0) -> int:
    """Bytes a run writes: the model's fp32 weights, `checkpoints` resumable checkpoints (weights
    and optimizer state, ~4x the weights each) and a dataset copy of `dataset_bytes`."""
    weights = BYTES_PER_PARAM * num_params
    return weights + checkpoints * CHECKPOINT_FACTOR * weights + dataset_bytes


def check_free_space(artifact_uri: str, needed_bytes: int, temp_bytes: int | None = None) -> None:
    """Refuse to start when a local artifact store (file:// or a path) has less room than
    `needed_bytes`, or the temporary directory less than `temp_bytes` (default: the same; models
    and checkpoints are written there first). Both on one file system must fit together.
    Remote stores (mlflow-artifacts:, s3:, ...) are not checked."""
    temp_bytes = needed_bytes if temp_bytes is None else temp_bytes
    wants = [("temporary directory", tempfile.gettempdir(), temp_bytes)]
    local = _local_path(artifact_uri)
    if local is not None:
        wants.insert(0, ("artifact store", local, needed_bytes))
    for where, path, need in _per_file_system([w for w in wants if w[2] > 0]):
        free = shutil.disk_usage(path).free
        if need > free:
            raise PipelineError(
                f"the {where} has {format_bytes(free)} free, but this run will write about {format_bytes(need)}; "
                f"free space there, point the experiment's artifact location elsewhere, {TMPDIR_FIX}")


def _local_path(artifact_uri: str) -> str | None:
    """The nearest existing folder of a local artifact URI, or None for a remote store."""
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file":
        path = Path(parsed.path)
    elif parsed.scheme == "" or len(parsed.scheme) == 1:  # a plain path (a Windows drive letter too)
        path = Path(artifact_uri)
    else:
        return None
    return _nearest_existing(path)


def _nearest_existing(path: Path) -> str:
    path = path.absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return str(path)


def _per_file_system(wants: list[tuple[str, str, int]]) -> list[tuple[str, str, int]]:
    """(where, path, bytes) per file system: needs on one device (same st_dev) compete for its space."""
    merged: dict[int, tuple[str, str, int]] = {}
    for label, path, need in wants:
        dev = os.stat(path).st_dev
        if dev in merged:
            where, first_path, first_need = merged[dev]
            merged[dev] = (f"{where} and {label} {path} (one file system)", first_path, first_need + need)
        else:
            merged[dev] = (f"{label} {path}", path, need)
    return list(merged.values())


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"


# -- errors on the way --------------------------------------------------------------------------

def describe_machine_error(exc: BaseException, uri: str | None = None) -> str | None:
    """The one line for a fault of the machine anywhere in exc's chain (__cause__/__context__: MLflow
    wraps OS errors in MlflowException), or None when it is something else."""
    os_error = _find_in_chain(exc, OSError, lambda e: e.errno in MACHINE_ERRNOS)
    if os_error is not None:
        return describe_os_error(os_error)
    uri = uri or mlflow.get_tracking_uri()
    if is_lost_server(exc, uri):
        lost = _find_in_chain(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))
        return (f"lost the tracking server {uri} for longer than MLflow retries ({_short(lost)}); once it answers, "
                "rerun (pretrain/finetune: --resume <run id>); see docs/troubleshooting.md to retry longer")
    return None


def is_lost_server(exc: BaseException, uri: str | None = None) -> bool:
    """True when an http(s) tracking server stopped answering (after MLflow's retries) somewhere in exc's chain."""
    uri = uri or mlflow.get_tracking_uri()
    lost = _find_in_chain(exc, (requests.exceptions.ConnectionError, requests.exceptions.Timeout))
    return lost is not None and urlparse(uri).scheme in ("http", "https")


def describe_os_error(err: OSError) -> str:
    what, fix = MACHINE_ERRNOS[err.errno]
    # A failed copy (shutil, MLflow's local artifact store) names the source first, the destination second.
    target = err.filename2 or err.filename
    if target:
        where = f"{target} ({format_bytes(shutil.disk_usage(_nearest_existing(Path(target))).free)} free there)"
    else:  # a failed write() names no file: say where runs write, and how full each place is
        where = "writing " + "; ".join(f"{label} {path} ({format_bytes(shutil.disk_usage(path).free)} free)"
                                       for label, path in _write_locations())
    return f"{what}: {where}; {fix}"


def _write_locations() -> list[tuple[str, str]]:
    places = [("temporary directory", tempfile.gettempdir())]
    run_id = mlflow.tracking.fluent._last_active_run_id.get()
    if run_id:
        try:
            local = _local_path(mlflow.get_run(run_id).info.artifact_uri)
        except Exception:  # the store itself may be what failed; the temp dir is still worth naming
            local = None
        if local:
            places.insert(0, ("artifact store", local))
    return places


def _find_in_chain(exc: BaseException | None, kinds, accept=lambda e: True) -> BaseException | None:
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, kinds) and accept(exc):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    return text if len(text) <= 120 else text[:117] + "..."


# -- a long outage in the middle of a run --------------------------------------------------------

class TrackingLost(PipelineError):
    """The server went away mid-run: ending the run would wait out MLflow's retries again, so don't."""


def kept_checkpoint_path(run_id: str, filename: str = "last.pt") -> str:
    """Where a training step keeps its last checkpoint when the run cannot take it (a lost server)."""
    return os.path.abspath(os.path.join(KEPT_CHECKPOINTS, run_id, filename))


def resume_command(step: str, run_id: str, checkpoint: str, artifact_dir: str = "checkpoints") -> str:
    """Shell commands that put the kept checkpoint into the run and resume the run from it."""
    return (f"mlflow artifacts log-artifact --local-file {checkpoint} --run-id {run_id} --artifact-path {artifact_dir}"
            f" && python -m steps.{step} --resume {run_id}")


def outage_message(uri: str, step: str, run_id: str, checkpoint: str | None, epoch: int | None = None) -> str:
    """One line for a step whose tracking server stayed away longer than MLflow's retry budget."""
    head = (f"lost the tracking server {uri} for longer than MLflow retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES, "
            f"..._BACKOFF_FACTOR, ..._TIMEOUT size that); {step} run {run_id} stopped")
    if checkpoint is None or not os.path.isfile(checkpoint):
        return f"{head} before its first epoch ended, nothing to resume; once the server answers, start it again"
    done = f" after epoch {epoch}" if epoch is not None else ""
    resume = resume_command(step, run_id, checkpoint)
    return f"{head}{done}, its checkpoint is kept at {checkpoint}; once the server answers: {resume}"
