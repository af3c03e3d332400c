"""Optuna storage: URLs, opening and checking a storage, the study lock, opening a study.

Storage URLs: ``sqlite:///path.db`` (default, one machine), ``postgresql+psycopg2://...`` (many
workers, many machines), or ``journal:///path.log`` / a path ending in ``.log`` (Optuna's journal
file, for shared filesystems without a database).

The worker loop (liveness, signals, counting) lives in ``workers.py``; samplers and pruners in
``samplers.py`` and ``pruners.py``.
"""

from __future__ import annotations

import contextlib
import threading
import time
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import optuna

from orchestrator.errors import UserError, redact_text

HEARTBEAT_S = 30

warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


# ----------------------------------------------------------------------------- URLs


def storage_url(storage: str | None, runs_dir: Path) -> str:
    """The study storage URL (default: ``sqlite:///<runs_dir>/optuna.db``)."""
    return storage or f"sqlite:///{(runs_dir / 'optuna.db').resolve()}"


def storage_kind(url: str) -> str:
    """``journal``, ``sqlite``, ``postgresql`` or ``rdb`` (another SQLAlchemy URL)."""
    if url.startswith("journal://") or url.endswith((".log", ".journal")):
        return "journal"
    if "://" not in url:
        raise UserError(f"study.storage {redact_text(url)!r} is not a URL: use sqlite:///file.db, "
                        "postgresql+psycopg2://user@host:port/db or journal:///file.log")
    scheme = url.split("://", 1)[0]
    if scheme.startswith("sqlite"):
        return "sqlite"
    return "postgresql" if scheme.startswith("postgres") else "rdb"


def _file_path(url: str) -> Path:
    """The file of a sqlite or journal URL."""
    if url.startswith("journal://"):
        return Path(url.removeprefix("journal://"))
    if url.startswith("sqlite:///"):
        return Path(url.removeprefix("sqlite:///"))
    return Path(url)


def check_storage(url: str) -> None:
    """Fail in one line if the storage cannot work; creates nothing (no schema, no file)."""
    kind = storage_kind(url)
    if kind in ("journal", "sqlite"):
        path = _file_path(url)
        if url.startswith("sqlite") and not url.startswith("sqlite:///"):
            raise UserError(f"study.storage {url!r}: use sqlite:///<absolute or relative path>")
        if not path.parent.is_dir():
            raise UserError(f"{kind} storage folder does not exist: {path.parent}")
        import os

        if not os.access(path.parent, os.W_OK | os.X_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise UserError(f"{kind} storage {path} is not writable")
        return
    try:
        with _engine(url).connect():
            pass
    except Exception as err:  # noqa: BLE001 - driver errors of every kind become one line
        raise UserError(f"cannot open study storage {redact_text(url)}: {_short(err)}") from None


def _engine(url: str) -> Any:
    import sqlalchemy
    from sqlalchemy.pool import NullPool

    return sqlalchemy.create_engine(url, poolclass=NullPool, **_engine_kwargs(url))


def _engine_kwargs(url: str) -> dict[str, Any]:
    if url.startswith("postgresql"):
        return {"connect_args": {"connect_timeout": 5}}
    if url.startswith("sqlite"):
        return {"connect_args": {"timeout": 60}}
    return {}


def make_storage(url: str, heartbeat_s: int = HEARTBEAT_S, grace_s: int | None = None,
                 on_stale: Callable[[Any, Any], None] | None = None, retries: int = 3) -> Any:
    """An Optuna storage for ``url`` (RDB storages with heartbeats); one line on failure.

    Creates the schema of a fresh database: call it under ``StudyLock(url, JOIN)``.
    """
    from optuna.storages import JournalStorage, RDBStorage
    from optuna.storages.journal import JournalFileBackend

    check_storage(url)
    if storage_kind(url) == "journal":
        return JournalStorage(JournalFileBackend(str(_file_path(url))))
    last: Exception | None = None
    for attempt in range(retries):
        try:
            with warnings.catch_warnings():  # heartbeats are "experimental" in Optuna 5.0
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return RDBStorage(url, heartbeat_interval=heartbeat_s,
                                  grace_period=grace_s or 3 * heartbeat_s,
                                  heartbeat_stale_trial_callback=on_stale,
                                  engine_kwargs={**_engine_kwargs(url), "pool_pre_ping": True})
        except Exception as err:  # noqa: BLE001 - any driver error becomes one line below
            last = err
            if not _is_race(err):
                break
            time.sleep(0.2 * (attempt + 1))
    raise UserError(f"cannot open study storage {redact_text(url)}: {_short(last)}")


def _is_race(err: Exception) -> bool:
    """Schema creation by two workers at once fails transiently (seen on sqlite and PostgreSQL)."""
    text = str(err).lower()
    return any(s in text for s in ("already exists", "unique constraint", "uniqueviolation", "locked"))


def _short(err: Exception | None) -> str:
    text = " ".join(str(err).split()) if err else "unknown error"
    text = text.split(" (Background on this error")[0].split(" [SQL:")[0]
    return redact_text(text)[:300]


# ----------------------------------------------------------------------------- the study lock

JOIN = "merge-orchestrator/join"


class StudyLock:
    """A lock shared by every worker of a storage, re-entrant within one process.

    PostgreSQL: a session advisory lock (released by the server if the worker dies). SQLite
    and journal files: ``flock`` on ``<file>.mo-lock`` (released by the kernel if the worker
    dies; on NFS it needs working NFS locks, as Optuna's journal does). Other databases: no
    lock (Optuna's own unique constraints and the retries in ``open_study`` remain).
    """

    def __init__(self, url: str, key: str) -> None:
        self.kind = storage_kind(url)
        self.url = url
        self.key = zlib.crc32(key.encode()) & 0x7FFFFFFF
        self._depth = 0
        self._conn: Any = None
        self._file: Any = None
        self._engine: Any = None
        self._thread_lock = threading.RLock()

    def __enter__(self) -> StudyLock:
        self._thread_lock.acquire()
        if self._depth == 0:
            try:
                self._acquire()
            except BaseException:
                self._thread_lock.release()
                raise
        self._depth += 1
        return self

    def __exit__(self, *exc: Any) -> None:
        self._depth -= 1
        try:
            if self._depth == 0:
                self._release()
        finally:
            self._thread_lock.release()

    def _acquire(self) -> None:
        import sqlalchemy

        if self.kind == "postgresql":
            self._engine = self._engine or _engine(self.url)
            self._conn = self._engine.connect()
            self._conn.execute(sqlalchemy.text("select pg_advisory_lock(:k)"), {"k": self.key})
        elif self.kind in ("sqlite", "journal"):
            import fcntl

            self._file = open(f"{_file_path(self.url)}.mo-lock", "a")  # noqa: SIM115 - held until release
            try:
                fcntl.flock(self._file.fileno(), fcntl.LOCK_EX)
            except OSError as err:  # a filesystem without locks: Optuna's own guards remain
                warn(f"warning: cannot lock {self._file.name} ({err.strerror}); workers that start at "
                     "the same moment may race")

    def _release(self) -> None:
        import sqlalchemy

        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.execute(sqlalchemy.text("select pg_advisory_unlock(:k)"), {"k": self.key})
            self._conn.close()
            self._conn = None
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None


# ----------------------------------------------------------------------------- opening a study


def open_study(name: str, storage: Any, sampler: Any, pruner: Any, directions: Sequence[str]) -> Any:
    """Create the study, or load it to resume; safe when several workers start at once."""
    for attempt in range(5):
        try:
            study = optuna.create_study(study_name=name, storage=storage, sampler=sampler, pruner=pruner,
                                        directions=list(directions), load_if_exists=True)
            break
        except Exception as err:  # noqa: BLE001 - the create/create race, retried below
            if attempt == 4 or not _is_race(err):
                raise
            time.sleep(0.2 * (attempt + 1))
    if list(study.directions) != [_direction(d) for d in directions]:
        raise UserError(f"study {name!r} already exists with {len(study.directions)} objective(s); "
                        f"this run wants {len(directions)}: use another study.name")
    return study


def _direction(text: str) -> Any:
    return optuna.study.StudyDirection.MAXIMIZE if text == "maximize" else optuna.study.StudyDirection.MINIMIZE


def warn(text: str) -> None:
    import sys

    print(text, file=sys.stderr, flush=True)
