"""Where a study lives: Optuna storages, SQL databases (with heartbeats) or journal files.

On SQL storages workers send a heartbeat every `heartbeat` seconds; a trial silent for GRACE_BEATS
of them (its worker was killed) is marked FAIL by the next worker that looks and handed to the
`on_stale` callback (pipeline.study.tracking.on_stale_trial: its MLflow run ends FAILED and a copy is
re-queued, up to MAX_RETRIES times, that continues from its last checkpoint). Journal files have
no heartbeat.
"""

from __future__ import annotations

import os
import random
import re
import time
import warnings
from collections.abc import Callable

import optuna
from optuna.trial import FrozenTrial

from pipeline.errors import PipelineError

GRACE_BEATS = 3
MAX_RETRIES = 2


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


def open_storage(storage: str, heartbeat: int = 60,
                 on_stale: Callable[[optuna.Study, FrozenTrial], None] | None = None) -> optuna.storages.BaseStorage:
    path = journal_path(storage)
    if path is not None:
        if not path:
            raise PipelineError("storage='journal:' names no file; use e.g. journal:optuna-journal.log")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise PipelineError(
                f"journal storage {path!r}: folder {parent!r} does not exist; create it or pick another path"
            )
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(path))
    if "://" not in storage:
        raise PipelineError(
            f"storage={storage!r} is neither a database URL (sqlite:///optuna.db, postgresql://...) "
            "nor a journal file (a path ending .log, or journal:PATH)"
        )
    try:
        return _open_rdb(storage, heartbeat, on_stale)
    except (ImportError, ValueError, RuntimeError) as exc:
        raise PipelineError(f"cannot open Optuna storage {storage_identity(storage)!r}: {exc}") from exc
    except Exception as exc:  # sqlalchemy's errors: bad URL, unreachable server, missing driver
        if type(exc).__module__.startswith("sqlalchemy"):
            raise PipelineError(f"cannot open Optuna storage {storage_identity(storage)!r}: {exc}") from exc
        raise


def _open_rdb(storage: str, heartbeat: int, on_stale, attempts: int = 3) -> optuna.storages.RDBStorage:
    """RDBStorage, retried: workers started together on a new database all create its tables, and
    all but one fail on the duplicates (seen with three on PostgreSQL); a retry finds them made."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(attempts):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(
                    storage,
                    heartbeat_interval=heartbeat,
                    grace_period=GRACE_BEATS * heartbeat,
                    heartbeat_stale_trial_callback=on_stale,
                )
        except (IntegrityError, ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(1 + random.random())
    raise AssertionError("unreachable")
