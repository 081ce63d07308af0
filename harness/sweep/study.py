"""The Optuna side: storage, sampler, pruner, and turning the search space into ``suggest_*`` calls.

Used by the driver (which asks for trials) and by each trial process (which reports to its trial
and asks the same pruner whether to stop), so both build them from the same config here.
"""

from __future__ import annotations

import contextlib
import re
import time
import warnings
from pathlib import Path
from typing import Any

import optuna

from harness.sweep.config import Choices, FaultTolerance, Range, SweepConfig
from harness import params
from harness.errors import HarnessError

optuna.logging.set_verbosity(optuna.logging.WARNING)
# Heartbeats and their retry callback are marked experimental; we rely on them on purpose.
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
# The driver beats the heartbeat itself around ask/tell (Optuna expects optimize() to do it).
warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used with Study.optimize")


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


def make_sampler(cfg: SweepConfig, seed: int | None = None) -> optuna.samplers.BaseSampler:
    """``seed`` defaults to the study seed; workers pass their own so they do not all draw alike."""
    s, seed = cfg.sampler, cfg.seed if seed is None else seed
    if s.name == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if s.name == "grid":
        grid = {name: _grid_values(dim) for name, dim in cfg.search_space.searched().items()}
        return optuna.samplers.GridSampler(grid, seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=s.n_startup_trials)


def make_pruner(cfg: SweepConfig) -> optuna.pruners.BasePruner:
    p = cfg.pruner
    if p.name == "none":
        return optuna.pruners.NopPruner()
    if p.name == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=max(1, p.n_warmup_steps or cfg.budget.eval_every))
    return optuna.pruners.MedianPruner(n_startup_trials=p.n_startup_trials, n_warmup_steps=p.n_warmup_steps)


def _grid_values(dim: Choices | Range) -> list[Any]:
    if isinstance(dim, Choices):
        return list(dim.choices)
    n = int(round((dim.high - dim.low) / dim.step)) + 1
    return [dim.low + i * dim.step for i in range(n)]


def suggest(trial: optuna.Trial, cfg: SweepConfig) -> dict[str, Any]:
    """Sample every searched dimension on ``trial``; fixed values are added as they are."""
    values: dict[str, Any] = {}
    for name, dim in cfg.search_space.searched().items():
        if isinstance(dim, Choices):
            values[name] = trial.suggest_categorical(name, dim.choices)
        elif name in params.INTEGER:
            values[name] = trial.suggest_int(name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
        else:
            values[name] = trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)
    values.update(cfg.search_space.fixed())
    return params.typed(values)


def trial_params(trial: optuna.trial.BaseTrial | optuna.trial.FrozenTrial, cfg: SweepConfig) -> dict[str, Any]:
    """A trial's full hyperparameters: what was sampled plus the fixed values."""
    return params.typed({**cfg.search_space.fixed(), **trial.params})


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


def create_study(cfg: SweepConfig, storage_url: str, sampler_seed: int | None = None) -> optuna.Study:
    """The driver's handle on the study: with heartbeats, so dead drivers' trials get retried."""
    return optuna.create_study(
        study_name=cfg.study, storage=make_storage(storage_url, cfg.fault_tolerance),
        sampler=make_sampler(cfg, sampler_seed),
        pruner=make_pruner(cfg), direction=cfg.objective.direction, load_if_exists=True,
    )


def load_study(cfg: SweepConfig, storage_url: str) -> optuna.Study:
    return optuna.load_study(
        study_name=cfg.study, storage=make_storage(storage_url), sampler=make_sampler(cfg), pruner=make_pruner(cfg),
    )


FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
_retry = optuna.storages.RetryHeartbeatStaleTrialCallback


def superseded(trials: list[optuna.trial.FrozenTrial]) -> set[int]:
    """Numbers of failed trials that a retry replaced."""
    out: set[int] = set()
    for t in trials:
        out.update(_retry.retry_history(t))
    return out


def counted_trials(study: optuna.Study) -> int:
    """Trials that count towards ``n_trials``: all of them, running and waiting ones included,
    except failed trials that a retry replaced (the retry counts in their place)."""
    trials = study.get_trials(deepcopy=False)
    gone = superseded(trials)
    return sum(1 for t in trials if t.number not in gone)


def finished_count(study: optuna.Study) -> int:
    """Trials that have ended (complete, pruned, or failed without a retry)."""
    trials = study.get_trials(deepcopy=False, states=FINISHED)
    gone = superseded(study.get_trials(deepcopy=False))
    return sum(1 for t in trials if t.number not in gone)
