"""Storages, and every use of Optuna's private APIs (one small adapter, so an Optuna upgrade
breaks one file): heartbeats, trial ids, the storage behind a study, stale trials and retries.

Three kinds of storage, one behaviour for the driver:

- **SQLite** (the default, one host): Optuna's ``RDBStorage`` with its heartbeats.
- **PostgreSQL / MySQL** (workers on several hosts): the same, made to ride out a database
  restart (:class:`ResilientRDBStorage`): calls that fail because the server went away are run
  again once it is back, in a way that never writes a trial or a state change twice.
- **Journal file** (hosts sharing a filesystem but no database): Optuna keeps no heartbeats there,
  so :class:`HeartbeatJournalStorage` adds them (host, pid and a timestamp on the trial), and
  :func:`fail_stale` fails and retries a dead driver's trial just as it does for an RDB storage.

Torch-free. Storage URLs may hold passwords: everything that prints one goes through
:func:`redact`.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator

import optuna
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.storages._rdb.storage import _create_scoped_session
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from harness.errors import HarnessError
from harness.sweep.config import FaultTolerance

log = logging.getLogger(__name__)

# How long a storage call keeps trying while the database server is unreachable (a restart, a
# fail-over) before the error reaches the caller.
RETRY_FOR_S = 60.0
# Our own bookkeeping on trials (system attributes) starts with this; retries do not inherit it.
PREFIX = "harness:"


def default_storage(study_dir: Path) -> str:
    return f"sqlite:///{(study_dir / 'study.db').resolve()}"


def redact(url: str) -> str:
    """A storage URL, or a message quoting one, fit for logs and results: any password replaced by
    ***, in the user info or in the query string (``?password=``). SQLite files and journals are
    returned as they are: they have no password."""
    from sqlalchemy.engine import make_url

    if url.startswith("sqlite:///") or journal_path(url) is not None:
        return url
    try:
        parsed = make_url(url)
    except Exception:  # noqa: BLE001 -- ArgumentError, or ValueError for a port that is no number
        parsed = None
    if parsed is None or url.count("@") > 1:
        # Not a URL SQLAlchemy can read (a message quoting one, say), or a raw "@" in the password,
        # which SQLAlchemy splits at the first "@", leaving the password's tail in the host or
        # path: hide everything from the user name's ":" to the last "@" of the same word (a user
        # name may hold an "@" too, as Azure's user@server).
        hidden = re.sub(r"(://[^:/?#\s]*:)\S*@", r"\1***@", url)
    elif parsed.password is not None:
        hidden = parsed.render_as_string(hide_password=True)
    else:
        hidden = url
    # Not URL.update_query_dict: its rendering percent-encodes "***". Keys such as password,
    # passwd, sslpassword.
    return re.sub(r"((?:^|[?&\s])[\w.-]*(?:pass|secret)[\w.-]*=)[^&#\s]*", r"\1***", hidden, flags=re.I)


def journal_path(url: str) -> str | None:
    """``journal:///abs/path.log`` or ``journal:relative.log``: Optuna's file journal, for clusters
    that share a filesystem but no database server."""
    if not url.startswith("journal:"):
        return None
    return url.removeprefix("journal:").removeprefix("//") or None


def make_storage(url: str, faults: FaultTolerance | None = None) -> optuna.storages.BaseStorage:
    """The storage behind ``url``; failures become one line with the URL's password hidden.

    With ``faults`` (the driver's handle), the storage keeps heartbeats: a trial whose heartbeat
    stops is failed after the grace period and retried (a new WAITING trial with the same
    parameters), at most ``faults.max_retries`` times. ``faults`` stays reachable as
    ``storage.faults``.
    """
    if (path := journal_path(url)) is not None:
        return HeartbeatJournalStorage(JournalFileBackend(path), faults)
    server = not url.startswith("sqlite")
    # A server's connections die with it: check each one before use (pre-ping) and open a new one
    # if it is gone. SQLite: trial processes write to the same file as the driver; wait for the
    # lock instead of failing.
    kwargs: dict[str, Any] = {"pool_pre_ping": True} if server else {"connect_args": {"timeout": 60}}
    heartbeat = {} if faults is None else dict(
        heartbeat_interval=max(1, round(faults.heartbeat_s)), grace_period=max(2, round(faults.grace_s)),
        heartbeat_stale_trial_callback=RetryStale(max_retry=faults.max_retries),
    )
    cls = ResilientRDBStorage if server else optuna.storages.RDBStorage
    started, attempt = time.monotonic(), 0
    try:
        while True:
            try:
                storage = cls(url, engine_kwargs=kwargs, **heartbeat)
                storage.faults = faults
                return storage
            except Exception as err:  # noqa: BLE001
                attempt += 1
                # Workers starting together on an empty database race to create Optuna's tables;
                # the loser sees a duplicate-key error and simply tries again. A server that is
                # restarting is waited for; a wrong password or database name fails at once.
                race = ("duplicate key" in str(err) or "already exists" in str(err)) and attempt < 5
                down = server and _transient(err) and time.monotonic() - started < RETRY_FOR_S
                if not (race or down):
                    raise
                if down:
                    _saw_outage(url, err)
                time.sleep(min(0.5 * attempt, 2.0))
    except ImportError:
        raise HarnessError(f"storage {redact(url)}: its database driver is not installed "
                           f"(PostgreSQL: pip install 'harness[postgres]')") from None
    except Exception as err:  # noqa: BLE001 - SQLAlchemy raises many kinds; all mean "cannot use it"
        message = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise HarnessError(f"storage {redact(url)}: cannot open it ({redact(message)})") from None


# --- A database server that goes away and comes back ---------------------------------------------

# Errors that mean "the server is not there right now", not "this request is wrong". Connection
# errors carry no SQLSTATE, so the driver's words are all there is; a wrong password or a missing
# database is not among them and fails at once.
_TRANSIENT = re.compile(
    r"connection refused|could not connect|connection failed|server closed the connection|"
    r"terminating connection|starting up|shutting down|not accepting connections|recovery mode|"
    r"connection reset|broken pipe|connection (is |was )?(closed|lost)|lost connection|gone away|"
    r"consuming input failed|sending query failed|ssl syscall|eof detected|timed? ?out|"
    r"deadlock detected|could not serialize", re.IGNORECASE)
# ... unless the server answered and said no: these need a person, not a retry.
_PERMANENT = re.compile(r"authentication failed|no pg_hba\.conf entry|does not exist|permission denied|"
                        r"access denied|unknown database", re.IGNORECASE)


def _transient(err: BaseException) -> bool:
    """Whether ``err`` (or what caused it: Optuna wraps SQLAlchemy's errors) says the database
    server went away or is restarting, so the same call may succeed once it is back."""
    import sqlalchemy.exc

    seen: set[int] = set()
    e: BaseException | None = err
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, sqlalchemy.exc.DBAPIError) and e.connection_invalidated:
            return True
        if isinstance(e, (sqlalchemy.exc.OperationalError, sqlalchemy.exc.InterfaceError)) \
                and _TRANSIENT.search(str(e)) and not _PERMANENT.search(str(e)):
            return True
        e = e.__cause__ or e.__context__
    return False


# When this process last saw each server (by URL) go away: the lock and stale-trial checks below
# behave differently for a while after an outage.
_OUTAGES: dict[str, float] = {}
_WARNED: dict[str, float] = {}


def _saw_outage(url: str, err: BaseException | None = None) -> None:
    now = _OUTAGES[url] = time.monotonic()
    if err is not None and now - _WARNED.get(url, -RETRY_FOR_S) >= RETRY_FOR_S:  # one line per outage
        _WARNED[url] = now
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        log.warning("storage %s is unreachable (%s): retrying for up to %.0f s", redact(url), redact(first),
                    RETRY_FOR_S)


def _watch_disconnects(engine: Any, url: str) -> None:
    """Note every dropped connection SQLAlchemy sees on ``engine``, including those its pre-ping
    finds dead and silently replaces (so a process idle during a restart still learns of it)."""
    import sqlalchemy

    def on_error(ctx: Any) -> None:
        if ctx.is_disconnect:
            _saw_outage(url)

    sqlalchemy.event.listen(engine, "handle_error", on_error)


_NOT_LANDED = object()


def _retrying(url: str, call: Callable[[], Any], landed: Callable[[], Any] | None = None) -> Any:
    """``call()``, run again with backoff while it fails because the server is away (up to
    :data:`RETRY_FOR_S`).

    A write whose connection broke may have committed all the same (the server got the COMMIT,
    we never got its answer). For a write that must not land twice, ``landed()`` checks, before
    each new attempt, whether an earlier one did: its result, or ``_NOT_LANDED``.
    """
    started, delay, failed = time.monotonic(), 0.1, False
    while True:
        try:
            if failed and landed is not None and (found := landed()) is not _NOT_LANDED:
                return found
            return call()
        except Exception as err:  # noqa: BLE001 - only transient ones are retried
            if not _transient(err) or time.monotonic() - started > RETRY_FOR_S:
                raise
            _saw_outage(url, err)
            failed = True
            # Short steps (at most 1 s): a holder of the study lock cut off by the outage must get
            # its calls through well before other workers take the lock again (see study_lock).
            time.sleep(delay)
            delay = min(2 * delay, 1.0)


def _retried(name: str) -> Callable[..., Any]:
    """RDBStorage's method ``name``, retried as a whole by :func:`_retrying`."""
    method = getattr(optuna.storages.RDBStorage, name)

    @functools.wraps(method)
    def retried(self: "ResilientRDBStorage", *args: Any, **kwargs: Any) -> Any:
        return _retrying(self.harness_url, lambda: method(self, *args, **kwargs))

    return retried


# System attributes that make two writes safe to retry: a random token written in the same
# transaction as the change, so after a lost answer we can tell whether the change landed.
CREATED = PREFIX + "created"
CHANGED = PREFIX + "state_changed"


class ResilientRDBStorage(optuna.storages.RDBStorage):
    """Optuna's RDB storage for a database server, riding out a restart of that server.

    Each method that talks to the database is run again while the server is away (see
    :func:`_retrying`); which ones may simply be run again, and why, is said where they are listed.
    Only the methods that touch the database are wrapped (not those built on them, such as
    ``get_all_trials`` on ``_get_trials``), so no retry loop nests in another.
    """

    faults: FaultTolerance | None = None

    def __init__(self, url: str, *args: Any, **kwargs: Any) -> None:
        self.harness_url = url
        super().__init__(url, *args, **kwargs)
        _watch_disconnects(self.engine, url)

    def __setstate__(self, state: dict[Any, Any]) -> None:
        super().__setstate__(state)
        _watch_disconnects(self.engine, self.harness_url)

    # Reads: nothing changes, so running them again is always safe.
    get_study_id_from_name = _retried("get_study_id_from_name")
    get_study_name_from_id = _retried("get_study_name_from_id")
    get_study_directions = _retried("get_study_directions")
    get_study_user_attrs = _retried("get_study_user_attrs")
    get_study_system_attrs = _retried("get_study_system_attrs")
    get_trial_user_attrs = _retried("get_trial_user_attrs")
    get_trial_system_attrs = _retried("get_trial_system_attrs")
    get_all_studies = _retried("get_all_studies")
    get_trial_param = _retried("get_trial_param")
    get_trial_id_from_study_id_trial_number = _retried("get_trial_id_from_study_id_trial_number")
    get_trial = _retried("get_trial")
    _get_trials = _retried("_get_trials")  # get_all_trials, and the cache in front of this storage
    _get_best_trial_id = _retried("_get_best_trial_id")
    _get_stale_trial_ids = _retried("_get_stale_trial_ids")

    # Writes that leave the same rows whether they land once or twice: attributes and
    # intermediate values are upserts (one row per key / step), a parameter's second insert is
    # ignored as a duplicate key, and a heartbeat is one row per trial holding the latest time.
    set_study_user_attr = _retried("set_study_user_attr")
    set_study_system_attr = _retried("set_study_system_attr")
    set_trial_user_attr = _retried("set_trial_user_attr")
    set_trial_system_attr = _retried("set_trial_system_attr")
    set_trial_intermediate_value = _retried("set_trial_intermediate_value")
    _set_trial_param = _retried("_set_trial_param")  # set_trial_param, and the cache's
    record_heartbeat = _retried("record_heartbeat")

    # A study created twice: the second attempt raises DuplicatedStudyError, which
    # create_study(load_if_exists=True) (all the harness uses) turns into loading the study.
    create_new_study = _retried("create_new_study")

    # delete_study is left alone: the harness never deletes, and a repeated delete would fail.

    def _create_new_trial(self, study_id: int, template_trial: FrozenTrial | None = None) -> FrozenTrial:
        """Optuna's trial creation (``study.ask``, ``study.add_trial`` for a retry), landing once.

        Creating a trial twice would leave a RUNNING trial no driver runs (Optuna ignores trials
        without a heartbeat: it would block the study for ever) or queue a retry twice. So the new
        trial carries a token, inserted in the same transaction, and after a lost answer we look
        for it before trying again. (Optuna's own version retries blindly, and holds no token.)
        """
        from optuna.storages._rdb import models as _rdb_models  # SQLAlchemy's ORM: only where it is used

        token = uuid.uuid4().hex
        if template_trial is None:  # what Optuna creates without a template: a bare RUNNING trial
            template = FrozenTrial(number=-1, state=TrialState.RUNNING, value=None, datetime_start=datetime.now(),
                                   datetime_complete=None, params={}, distributions={}, user_attrs={},
                                   system_attrs={}, intermediate_values={}, trial_id=-1)
        else:
            template = copy.deepcopy(template_trial)
        template.system_attrs = {**template.system_attrs, CREATED: token}

        def create() -> FrozenTrial:
            with _create_scoped_session(self.scoped_session) as session:
                # Locking the study row serialises trial numbers (as Optuna does).
                _rdb_models.StudyModel.find_or_raise_by_id(study_id, session, for_update=True)
                row = self._get_prepared_new_trial(study_id, template, session)
                session.flush()
                number, trial_id, start = row.number, row.trial_id, row.datetime_start
            frozen = copy.deepcopy(template)
            frozen.number, frozen.datetime_start, frozen._trial_id = number, start, trial_id
            return frozen

        def landed() -> Any:
            for t in optuna.storages.RDBStorage._get_trials(self, study_id, None, set(), -1):
                if t.system_attrs.get(CREATED) == token:
                    return t
            return _NOT_LANDED

        return _retrying(self.harness_url, create, landed)

    def set_trial_state_values(self, trial_id: int, state: TrialState,
                               values: list[float] | None = None) -> bool:
        """Optuna's state change (claiming a WAITING trial, finishing one), landing once.

        Run blindly again after a lost answer, a change that did land looks like someone else's:
        a claim answers "another worker took it" (the trial stays RUNNING with no one on it), a
        tell or a stale trial's FAIL answers "already finished" (the driver's result is refused;
        no retry is queued for the stale trial: it is lost). Nor may we just compare the state
        afterwards: two workers that raced to fail a stale trial would both see FAIL and both
        queue a retry. So the change carries a token, written in the same transaction, and after
        a lost answer we look for it first.
        """
        import sqlalchemy.exc
        from optuna.storages._rdb import models as _rdb_models

        token = uuid.uuid4().hex

        def change() -> bool:
            # Optuna's set_trial_state_values, with the token written alongside.
            try:
                with _create_scoped_session(self.scoped_session) as session:
                    trial = _rdb_models.TrialModel.find_or_raise_by_id(trial_id, session, for_update=True)
                    self.check_trial_is_updatable(trial_id, trial.state)
                    if state == TrialState.RUNNING and trial.state != TrialState.WAITING:
                        return False
                    self._set_trial_attr_without_commit(session, _rdb_models.TrialSystemAttributeModel,
                                                        trial_id, CHANGED, token)
                    if values is not None:
                        for objective, v in enumerate(values):
                            self._set_trial_value_without_commit(session, trial, objective, v)
                    trial.state = state
                    if state == TrialState.RUNNING:
                        trial.datetime_start = datetime.now()
                    if state.is_finished():
                        trial.datetime_complete = datetime.now()
            except sqlalchemy.exc.IntegrityError:
                return False
            return True

        def landed() -> Any:
            attrs = optuna.storages.RDBStorage.get_trial_system_attrs(self, trial_id)
            return True if attrs.get(CHANGED) == token else _NOT_LANDED

        return _retrying(self.harness_url, change, landed)

    def recently_down(self) -> bool:
        """Whether this process saw the server away within the last grace period.

        Heartbeats could not be written while it was away, so for a grace period after it is
        back every trial may look stale; their drivers need that long to beat again."""
        grace = self.grace_period or 2 * (self.heartbeat_interval or 0)
        return time.monotonic() - _OUTAGES.get(self.harness_url, float("-inf")) < grace


# --- Heartbeats on a journal file ----------------------------------------------------------------

HEARTBEAT = PREFIX + "heartbeat"
_HOST = socket.gethostname()


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _pid_namespace() -> str | None:
    """This kernel boot and PID namespace: a pid means the same process only within it (two
    containers may share a host name, e.g. with host networking, but never this)."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    boot = _read("/proc/sys/kernel/random/boot_id")
    return f"{boot}/{ns}" if boot else None


_PID_NS = _pid_namespace()


def _process_started(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot), None if there is no such process;
    with the pid it names one process, even after the pid is reused."""
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22, counted after the command name


def _driver_gone(beat: dict[str, Any]) -> bool:
    """Whether the process that beat ``beat`` is certainly dead: only decidable for a process
    of this host (same PID namespace); elsewhere the timestamp alone tells."""
    if _PID_NS is None or beat.get("host") != _HOST or beat.get("pid_ns") != _PID_NS:
        return False
    return _process_started(int(beat["pid"])) != beat.get("started")


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage, with the heartbeats Optuna gives only to RDB storages.

    The driver's heartbeat thread writes, every ``heartbeat_s``, a system attribute on its
    trial: host, pid (and what makes that pid unambiguous) and the time. A RUNNING trial is stale
    when that time is older than ``grace_s``, or at once when its driver ran on this host and is
    gone. Implementing Optuna's ``BaseHeartbeat`` interface, the storage works with Optuna's own
    ``fail_stale_trials``: stale trials are failed and retried exactly as for an RDB storage.

    Wall clocks of the hosts must agree to well within ``grace_s`` (NTP does that).
    Each beat is one line in the journal: a study's journal grows by one line per
    ``heartbeat_s`` per running trial.
    """

    def __init__(self, backend: JournalFileBackend, faults: FaultTolerance | None = None) -> None:
        super().__init__(backend)
        self.faults = faults

    def record_heartbeat(self, trial_id: int) -> None:
        pid = os.getpid()
        self.set_trial_system_attr(trial_id, HEARTBEAT, {
            # The trial id: a retry copies its failed trial's system attributes, old beat included.
            "trial_id": trial_id, "host": _HOST, "pid": pid, "pid_ns": _PID_NS,
            "started": _process_started(pid), "at": time.time(),
        })

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        assert self.faults is not None
        now, stale = time.time(), []
        for t in self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,)):
            beat = t.system_attrs.get(HEARTBEAT)
            if not isinstance(beat, dict) or beat.get("trial_id") != t._trial_id:
                beat = None
            # No beat of its own yet (its driver is between asking for it and starting its
            # heartbeat, or died there): the trial's start is its last sign of life.
            last = beat["at"] if beat else t.datetime_start.timestamp() if t.datetime_start else 0.0
            if now - last > self.faults.grace_s or (beat is not None and _driver_gone(beat)):
                stale.append(t._trial_id)
        return stale

    def get_heartbeat_interval(self) -> float | None:  # type: ignore[override]
        return None if self.faults is None else self.faults.heartbeat_s

    def get_heartbeat_stale_trial_callback(self) -> Callable[[optuna.Study, FrozenTrial], None] | None:
        return None if self.faults is None else RetryStale(max_retry=self.faults.max_retries)


class RetryStale(optuna.storages.RetryHeartbeatStaleTrialCallback):
    """Optuna's retry of a stale trial (a WAITING copy with its parameters and retry history),
    minus our own bookkeeping: the old trial's heartbeat and tokens are not the retry's."""

    def __call__(self, study: optuna.Study, trial: FrozenTrial) -> None:
        trial = copy.copy(trial)
        trial.system_attrs = {k: v for k, v in trial.system_attrs.items() if not k.startswith(PREFIX)}
        super().__call__(study, trial)


# --- The study lock ------------------------------------------------------------------------------

_LOCK_ENGINES: dict[str, Any] = {}
_LOCKED_AT: dict[str, float] = {}  # when this process last took each server's lock
_LOCK_SQL = "SELECT pg_advisory_lock(hashtext('harness-ask'))"
_UNLOCK_SQL = "SELECT pg_advisory_unlock(hashtext('harness-ask'))"
# After an outage, how long a process waits before taking the lock again (see _advisory_lock).
HOLDER_HEADSTART_S = 5.0


@contextlib.contextmanager
def study_lock(url: str):
    """Serialise "count the trials, then ask for one" across threads, workers and hosts, so
    ``n_trials`` holds exactly: a PostgreSQL advisory lock, or a file lock beside a SQLite file or
    a journal (the journal's folder is shared by all its hosts)."""
    if url.startswith("postgresql"):
        with _advisory_lock(url):
            yield
        return
    if (journal := journal_path(url)) is not None:
        # Not "<journal>.lock": that name is Optuna's own lock on the journal (a symlink it creates
        # and, finding a file there for 30 s, deletes).
        lock = journal + ".ask.lock"
    elif url.startswith("sqlite:///"):
        lock = url.split("///", 1)[1] + ".lock"
    else:
        yield
        return
    import filelock

    # A new FileLock each time: its own descriptor, so threads of one process exclude each other
    # as processes and hosts do (flock; the file stays in place for the next waiter).
    with filelock.FileLock(lock):
        yield


def _lock_engine(url: str) -> Any:
    import sqlalchemy

    if url not in _LOCK_ENGINES:
        # Autocommit: the lock belongs to the session, no transaction stays open while it is held.
        engine = sqlalchemy.create_engine(url, pool_size=1, pool_pre_ping=True, isolation_level="AUTOCOMMIT")
        _watch_disconnects(engine, url)
        _LOCK_ENGINES.setdefault(url, engine)
    return _LOCK_ENGINES[url]


@contextlib.contextmanager
def _advisory_lock(url: str) -> Iterator[None]:
    """PostgreSQL's session-level advisory lock, surviving a restart of the server.

    A restart ends every session, and the lock with its holder's. The holder's section goes on
    (its storage calls wait for the server and go through) and, at its end, finds nothing to
    release. To keep another worker from entering meanwhile, a process that has seen the server
    away since it last held the lock waits :data:`HOLDER_HEADSTART_S` once the server is back
    before locking: far longer than the rest of a section (a few storage calls), which resumes
    within a second of the server's return. (A worker that starts for the first time in those
    seconds knows of no outage and does not wait; that is the one gap left.)
    """
    import sqlalchemy

    engine = _lock_engine(url)
    failing_since: float | None = None
    delay = 0.1
    while True:
        conn = None
        try:
            conn = engine.connect()  # pre-ping: a connection the restart killed is noted and replaced
            if _OUTAGES.get(url, float("-inf")) > _LOCKED_AT.get(url, float("-inf")):
                time.sleep(HOLDER_HEADSTART_S)
            conn.execute(sqlalchemy.text(_LOCK_SQL))
            _LOCKED_AT[url] = time.monotonic()
            break
        except Exception as err:  # noqa: BLE001 - only transient ones are retried
            if conn is not None:
                conn.close()
            failing_since = failing_since or time.monotonic()
            if not _transient(err) or time.monotonic() - failing_since > RETRY_FOR_S:
                raise
            _saw_outage(url, err)
            time.sleep(delay)
            delay = min(2 * delay, 1.0)
    try:
        yield
    finally:
        try:
            conn.execute(sqlalchemy.text(_UNLOCK_SQL))
        except Exception as err:  # noqa: BLE001
            if not _transient(err):
                raise
            _saw_outage(url, err)  # the server went away during the section: the lock went with it
        finally:
            conn.close()


# --- What the driver and the trial processes call ------------------------------------------------

def storage_of(study: optuna.Study) -> optuna.storages.BaseStorage:
    return study._storage


def trial_id(trial: optuna.Trial) -> int:
    return trial._trial_id


CURVE = "curve"  # user attribute: a multi-objective trial's validation loss by milestone


def report_intermediate(trial: optuna.Trial, step: int, value: float) -> None:
    """``Trial.report``, in a multi-objective study too. Optuna refuses ``report`` there (its
    pruners are single-objective), and its TPE sampler cannot rank a pruned multi-objective trial
    that has intermediate values, so there the curve is kept as the user attribute ``curve``
    instead; :func:`curve` reads either."""
    if len(trial.study.directions) == 1:
        trial.report(value, step)
        return
    points = dict(trial.user_attrs.get(CURVE, {}))
    points[str(step)] = value
    trial.set_user_attr(CURVE, points)


def curve(trial: optuna.trial.FrozenTrial) -> dict[int, float]:
    """A trial's validation loss by milestone, single- or multi-objective."""
    if trial.intermediate_values:
        return dict(trial.intermediate_values)
    return {int(k): float(v) for k, v in trial.user_attrs.get(CURVE, {}).items()}


class _Heartbeat:
    """Beats ``trial_id``'s heartbeat every ``interval`` seconds from a background thread.

    Unlike Optuna's thread, it outlives a failed beat (a storage briefly out of reach) instead of
    dying and letting a live trial go stale, and it stops once the trial is finished elsewhere."""

    def __init__(self, storage: Any, trial_id: int, interval: float):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"heartbeat-{trial_id}", daemon=True)

    def _beat(self) -> None:
        warned = False
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except optuna.exceptions.UpdateFinishedTrialError:
                return  # another driver judged it stale and failed it: nothing left to keep alive
            except Exception as err:  # noqa: BLE001 - the next beat may get through
                if not warned:
                    log.warning("heartbeat of trial id %d failed (%s); still trying", self.trial_id, err)
                    warned = True
            if self.stop.wait(self.interval):
                return


@contextlib.contextmanager
def heartbeat(study: optuna.Study, trial: optuna.Trial) -> Iterator[None]:
    """Beat the trial's heartbeat while its driver is alive; if it stops, another driver (or this
    one, restarted) fails the trial after the grace period and retries it."""
    storage = study._storage
    if not is_heartbeat_enabled(storage):
        yield
        return
    beat = _Heartbeat(storage, trial._trial_id, storage.get_heartbeat_interval())
    beat.thread.start()
    try:
        yield
    finally:
        beat.stop.set()
        beat.thread.join()


def fail_stale(study: optuna.Study) -> None:
    """Fail the RUNNING trials whose driver is gone and queue their retries: Optuna's
    ``fail_stale_trials``, with each stale trial's record (outcome ``stale``, from
    :func:`harness.sweep.outcome.stale`) written while it is still RUNNING (a finished trial takes
    no more attributes). Two drivers that find the same trial stale write the same record; only one
    fails it and queues its retry."""
    from harness.sweep.outcome import stale

    storage = study._storage
    backend = getattr(storage, "_backend", storage)  # behind Optuna's cache
    if isinstance(backend, ResilientRDBStorage) and backend.recently_down():
        return
    if not isinstance(storage, BaseHeartbeat) or not is_heartbeat_enabled(storage):
        return
    faults = getattr(backend, "faults", None)
    failed = []
    for trial_id in storage._get_stale_trial_ids(study._study_id):
        try:
            number = storage.get_trial(trial_id).number
            for key, value in stale(number, faults.grace_s if faults else 0).user_attrs().items():
                storage.set_trial_user_attr(trial_id, key, value)
            if storage.set_trial_state_values(trial_id, state=TrialState.FAIL):
                failed.append(trial_id)
        except optuna.exceptions.UpdateFinishedTrialError:
            pass  # another driver failed it first
    callback = storage.get_heartbeat_stale_trial_callback()
    if callback is not None:
        for trial_id in failed:
            callback(study, copy.deepcopy(storage.get_trial(trial_id)))


_retry = optuna.storages.RetryHeartbeatStaleTrialCallback


def retried_numbers(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry replaced."""
    out: set[int] = set()
    for t in trials:
        out.update(_retry.retry_history(t))
    return out
