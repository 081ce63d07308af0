"""Storages, and every use of Optuna's private APIs (one small adapter, so an Optuna upgrade
breaks one file): heartbeats, trial ids, the storage behind a study, stale trials and retries.

Torch-free. Storage URLs may hold passwords: everything that prints one goes through
:func:`redact`.
"""

from __future__ import annotations

import contextlib
import re
import time
from pathlib import Path
from typing import Any, Iterator

import optuna
from optuna.storages import fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread

from harness.errors import HarnessError
from harness.sweep.config import FaultTolerance


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def redact(url: str) -> str:
    """A storage URL fit for logs and results: any password replaced by ***."""
    return re.sub(r"(://[^:/@]+:)[^@]*@", r"\1***@", url)


def journal_path(url: str) -> str | None:
    """``journal:///abs/path.log`` or ``journal:relative.log``: Optuna's file journal, for clusters
    that share a filesystem but no database server."""
    if not url.startswith("journal:"):
        return None
    return url.removeprefix("journal:").removeprefix("//") or None


def make_storage(url: str, faults: FaultTolerance | None = None) -> optuna.storages.BaseStorage:
    """An RDB storage; failures become one line with the URL's password hidden.

    With ``faults``, the storage keeps heartbeats: a trial whose heartbeat stops is failed after
    the grace period and retried (a new WAITING trial with the same parameters).
    """
    if (path := journal_path(url)) is not None:
        # Journal storage keeps no heartbeats: a dead driver's trial stays RUNNING there.
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        return JournalStorage(JournalFileBackend(path))
    # SQLite: trial processes write to the same file as the driver; wait for the lock instead of failing.
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    heartbeat = {} if faults is None else dict(
        heartbeat_interval=max(1, round(faults.heartbeat_s)), grace_period=max(2, round(faults.grace_s)),
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=faults.max_retries),
    )
    try:
        for attempt in range(5):
            try:
                return optuna.storages.RDBStorage(url, engine_kwargs=kwargs, **heartbeat)
            except Exception as err:  # noqa: BLE001
                # Workers starting together on an empty database race to create Optuna's tables;
                # the loser sees a duplicate-key error and simply tries again.
                if "duplicate key" not in str(err) and "already exists" not in str(err) or attempt == 4:
                    raise
                time.sleep(0.5 * (attempt + 1))
    except ImportError:
        raise HarnessError(f"storage {redact(url)}: its database driver is not installed "
                           f"(PostgreSQL: pip install 'harness[postgres]')") from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds; all mean "cannot use it"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HarnessError(f"storage {redact(url)}: cannot open it ({redact(message)})") from None


_LOCK_ENGINES: dict[str, Any] = {}


@contextlib.contextmanager
def study_lock(url: str):
    """Serialise "count the trials, then ask for one" across threads, workers and hosts, so
    ``n_trials`` holds exactly: a PostgreSQL advisory lock, or a file lock beside a SQLite file or
    a journal (the journal's folder is shared by all its hosts)."""
    if url.startswith("postgresql"):
        import sqlalchemy

        engine = _LOCK_ENGINES.get(url) or _LOCK_ENGINES.setdefault(url, sqlalchemy.create_engine(url, pool_size=1))
        with engine.connect() as conn:
            conn.execute(sqlalchemy.text("SELECT pg_advisory_lock(hashtext('harness-ask'))"))
            try:
                yield
            finally:
                conn.execute(sqlalchemy.text("SELECT pg_advisory_unlock(hashtext('harness-ask'))"))
                conn.commit()
        return
    path = journal_path(url) or (url.split("///", 1)[1] if url.startswith("sqlite:///") else None)
    if path is None:
        yield
        return
    import fcntl

    with open(path + ".lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def trial_id(trial: optuna.Trial) -> int:
    return trial._trial_id


def trial_handle(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> optuna.Trial:
    """A live ``Trial`` for a trial another process asked for (to report to and ask the pruner)."""
    return optuna.trial.Trial(study, frozen._trial_id)


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Beat the trial's heartbeat while its driver is alive; if it stops, another driver (or this
    one, restarted) fails the trial after the grace period and retries it."""
    with get_heartbeat_thread(trial._trial_id, study._storage):
        yield


def fail_stale(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose driver is gone (and queue their retries)."""
    fail_stale_trials(study)


_retry = optuna.storages.RetryHeartbeatStaleTrialCallback


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry replaced."""
    out: set[int] = set()
    for t in trials:
        out.update(_retry.retry_history(t))
    return out
