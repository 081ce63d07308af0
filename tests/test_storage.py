"""Storages that outlive their drivers and their server: heartbeats on a journal file (a killed
driver's trial is failed and retried, not left RUNNING for ever), and a PostgreSQL study whose
server restarts mid-study (drivers reconnect; nothing lost, nothing written or run twice)."""

import os
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime

import optuna
import polars as pl
import pytest
import sqlalchemy.exc
import yaml

from conftest import ROOT, run_cli, wait_for
from harness.sweep import storage as S
from harness.sweep.config import FaultTolerance

pytestmark = [pytest.mark.timeout(600), pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning"),
              pytest.mark.filterwarnings("ignore:Heartbeat of storage")]
State = optuna.trial.TrialState
FAULTS = {"heartbeat_s": 1, "grace_s": 3, "max_retries": 1}

SWEEP = {
    "study": "kept", "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
    "dataset": {"source": "shakespeare", "max_val_rows": 16}, "max_seq_length": 64,
    "budget": {"max_steps": 6, "eval_every": 3, "hang_timeout_s": 120},
    "search_space": {"batch_size": 4, "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}, "lora_r": 4},
    "sampler": {"name": "random"}, "pruner": {"name": "none"}, "n_trials": 3,
    "fault_tolerance": FAULTS, "wandb": {"mode": "offline"},
}


def join(sweep_file, storage: str, results, faults: str = "") -> subprocess.Popen:
    """``harness join`` as a user starts it; its output goes to ``<results>.out`` (read it with
    :func:`finish`)."""
    with open(f"{results}.out", "a") as out:
        proc = subprocess.Popen([sys.executable, "-m", "harness.cli", "join", str(sweep_file), "--storage", storage,
                                 "--results-dir", str(results)],
                                cwd=ROOT, env=dict(os.environ, HARNESS_FAULTS=faults), stdout=out,
                                stderr=subprocess.STDOUT, text=True)
    proc.out = f"{results}.out"
    return proc


def finish(proc: subprocess.Popen, timeout: float = 400) -> str:
    """Wait for a driver; assert it succeeded."""
    proc.wait(timeout=timeout)
    out = open(proc.out).read()
    assert proc.returncode == 0, out[-3000:]
    return out


_POLLING: dict[str, optuna.storages.BaseStorage] = {}


def trials_of(name: str, url: str) -> list[optuna.trial.FrozenTrial]:
    """The study's trials as they are now (one storage per URL: a new one per look would open a
    new database connection each time)."""
    try:
        if url not in _POLLING:
            _POLLING[url] = S.make_storage(url)
        return optuna.load_study(study_name=name, storage=_POLLING[url]).trials
    except Exception:  # noqa: BLE001 - the storage or the study is not there yet
        return []


def assert_whole(study: optuna.Study, n_trials: int) -> None:
    """The study ended with ``n_trials`` counted trials, nothing left RUNNING or WAITING."""
    from harness.sweep.study import counted_trials, finished_count

    assert not [t.number for t in study.trials if t.state in (State.RUNNING, State.WAITING)]
    assert counted_trials(study) == finished_count(study) == n_trials


# --- Journal heartbeats ---------------------------------------------------------------------------

@pytest.mark.slow
def test_journal_driver_killed_mid_trial_is_failed_and_retried(tmp_path, harness_cache):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SWEEP))
    url = f"journal:///{tmp_path / 'kept.journal'}"
    # Trial 1 hangs (the driver would kill it after hang_timeout_s; the driver dies first).
    first = join(tmp_path / "s.yaml", url, tmp_path / "r", faults="1:hang@1")

    def beating(number):
        t = next((t for t in trials_of("kept", url) if t.number == number and t.state == State.RUNNING), None)
        return t if t is not None and S.HEARTBEAT in t.system_attrs and "pid" in t.user_attrs else None

    try:
        assert wait_for(lambda: beating(1)), "trial 1 never ran"
        beat = beating(1).system_attrs[S.HEARTBEAT]
        assert beat["pid"] == first.pid and beat["host"] == S._HOST
        assert wait_for(lambda: beating(1).system_attrs[S.HEARTBEAT]["at"] > beat["at"], timeout=10), \
            "the heartbeat is not refreshed"
        trial_pid = beating(1).user_attrs["pid"]
        first.send_signal(signal.SIGKILL)
        first.wait()
    finally:
        first.kill()
    # Its trial process dies with it (an orphan still training would make the retry a duplicate).
    assert wait_for(lambda: not os.path.exists(f"/proc/{trial_pid}"), timeout=30), trial_pid
    assert [t.state for t in trials_of("kept", url)][1] == State.RUNNING  # what blocked every rerun before

    again = join(tmp_path / "s.yaml", url, tmp_path / "r")  # the same command, typed again
    finish(again)
    study = optuna.load_study(study_name="kept", storage=S.make_storage(url))
    trials = {t.number: t for t in study.trials}
    retry = next(t for t in trials.values() if t.system_attrs.get("failed_trial") == 1)
    assert trials[1].state == State.FAIL and retry.state == State.COMPLETE and retry.params == trials[1].params
    assert trials[1].user_attrs["outcome"] == "stale"
    assert S.retried_numbers(study.trials) == {1} and len(trials) == SWEEP["n_trials"] + 1
    assert retry.system_attrs[S.HEARTBEAT]["trial_id"] == retry._trial_id  # its own beat, not trial 1's
    assert_whole(study, SWEEP["n_trials"])


def _running(study, beat: dict | None = None) -> optuna.trial.FrozenTrial:
    """A RUNNING trial with ``beat`` as its heartbeat (made up: another host's, a dead one's)."""
    trial = study.ask({"x": optuna.distributions.FloatDistribution(0, 1)})
    if beat is not None:
        study._storage.set_trial_system_attr(trial._trial_id, S.HEARTBEAT, {"trial_id": trial._trial_id, **beat})
    return study._storage.get_trial(trial._trial_id)


def test_journal_stale_rules(tmp_path):
    url = f"journal:///{tmp_path / 'j.log'}"
    storage = S.make_storage(url, FaultTolerance(**FAULTS))
    assert storage.faults.grace_s == 3
    study = optuna.create_study(study_name="rules", storage=storage)
    elsewhere = {"host": "another-host", "pid": os.getpid(), "pid_ns": "x", "started": "1"}
    old = _running(study, {**elsewhere, "at": time.time() - 10})  # another host's, silent for 10 s
    fresh = _running(study, {**elsewhere, "at": time.time()})  # another host's, just now
    dead_pid = subprocess.run(["sh", "-c", "echo $$"], capture_output=True, text=True).stdout.strip()
    dead = _running(study, {"host": S._HOST, "pid": int(dead_pid), "pid_ns": S._PID_NS, "started": "1",
                            "at": time.time()})  # this host's, just now, but its process is gone
    live = _running(study)
    started_now = _running(study)  # no beat of its own yet (a beat copied from another trial)
    storage.set_trial_system_attr(started_now._trial_id, S.HEARTBEAT, {**elsewhere, "trial_id": old._trial_id,
                                                                      "at": time.time() - 100})
    with S.heartbeat(study, optuna.trial.Trial(study, live._trial_id)):
        time.sleep(1.5)
        S.fail_stale(study)
    beat = storage.get_trial(live._trial_id).system_attrs[S.HEARTBEAT]
    assert beat["pid"] == os.getpid() and beat["host"] == S._HOST and time.time() - beat["at"] < 2

    states = {t.number: t.state for t in study.trials}
    assert states[old.number] == states[dead.number] == State.FAIL
    assert states[fresh.number] == states[live.number] == states[started_now.number] == State.RUNNING
    retries = [t for t in study.trials if t.state == State.WAITING]
    assert sorted(t.system_attrs["failed_trial"] for t in retries) == [old.number, dead.number]
    assert all(not k.startswith(S.PREFIX) for t in retries for k in t.system_attrs)  # no stale beat inherited
    assert S.retried_numbers(study.trials) == {old.number, dead.number}

    # A retry that goes stale in turn is failed, and not retried again: max_retries is 1.
    retry = study.ask()
    assert retry.number == retries[0].number
    storage.set_trial_system_attr(retry._trial_id, S.HEARTBEAT, {**elsewhere, "trial_id": retry._trial_id,
                                                                "at": time.time() - 10})
    S.fail_stale(study)
    assert storage.get_trial(retry._trial_id).state == State.FAIL
    assert len([t for t in study.trials if t.state == State.WAITING]) == 1


def test_sqlite_heartbeats_still_fail_and_retry_a_silent_trial(tmp_path):
    """The same heartbeat thread and retry serve Optuna's RDB heartbeats (SQLite, the default)."""
    study = optuna.create_study(study_name="rdb", storage=S.make_storage(f"sqlite:///{tmp_path / 'db'}",
                                                                           FaultTolerance(heartbeat_s=1, grace_s=2)))
    silent, alive = study.ask(), study.ask()
    silent.suggest_float("x", 0, 1)
    with S.heartbeat(study, silent):
        pass  # one beat (the thread beats before it first waits), then silence
    with S.heartbeat(study, alive):
        def silent_failed() -> bool:
            S.fail_stale(study)
            return study.trials[0].state == State.FAIL

        assert wait_for(silent_failed, timeout=30), "the silent trial never went stale"
        states = [t.state for t in study.trials]
    assert study.trials[0].user_attrs["outcome"] == "stale"
    assert states == [State.FAIL, State.RUNNING, State.WAITING]
    retry = study.trials[2]
    assert retry.params == study.trials[0].params and S.retried_numbers(study.trials) == {0}


# --- PostgreSQL restarts ----------------------------------------------------------------------------

@pytest.mark.slow
def test_storage_and_lock_ride_out_a_server_restart(postgres):
    faults = FaultTolerance(**FAULTS)
    study = optuna.create_study(study_name="outage", storage=S.make_storage(postgres.url, faults))
    trial = study.ask()
    x = trial.suggest_float("x", 0, 1)
    errors, steps = [], []

    def report():  # a driver reporting a trial's milestones while the server is away
        for step in range(40):
            try:
                trial.report(step / 10, step)
                steps.append(step)
            except Exception as err:  # noqa: BLE001
                errors.append(err)
            time.sleep(0.1)

    reporter = threading.Thread(target=report)
    with S.heartbeat(study, trial):
        reporter.start()
        with S.study_lock(postgres.url):
            time.sleep(0.5)
            postgres.restart(down_s=2)  # down for 2 s: calls fail, then go through
        with S.study_lock(postgres.url):  # taken again once the server is back
            S.fail_stale(study)  # heartbeats stopped during the outage: no live trial goes stale for it
        reporter.join()
    assert not errors and steps == list(range(40))
    study.tell(trial, x)
    [t] = study.trials
    assert t.state == State.COMPLETE and sorted(t.intermediate_values) == list(range(40))
    assert S._OUTAGES[postgres.url] > 0


def _lose_answers(monkeypatch, times: int) -> list[int]:
    """The next ``times`` storage transactions commit, but their answer is lost (as when the
    server dies between COMMIT and its reply): the caller sees a dropped connection."""
    real, lost = S._create_scoped_session, []

    from contextlib import contextmanager

    @contextmanager
    def scoped(*args, **kwargs):
        with real(*args, **kwargs) as session:
            yield session
        if len(lost) < times:
            lost.append(1)
            raise sqlalchemy.exc.OperationalError("COMMIT", {}, Exception("server closed the connection unexpectedly"),
                                                  connection_invalidated=True)

    monkeypatch.setattr(S, "_create_scoped_session", scoped)
    return lost


def test_a_write_whose_answer_was_lost_lands_once(postgres, monkeypatch):
    storage = S.make_storage(postgres.url, FaultTolerance(**FAULTS))
    study = optuna.create_study(study_name="lost-answers", storage=storage)
    # A new trial: created once, and ours.
    lost = _lose_answers(monkeypatch, 1)
    trial = study.ask()
    assert lost and len(study.trials) == 1 and study.trials[0].state == State.RUNNING
    trial.suggest_float("x", 0, 1)
    # Finishing it: True, not "already finished".
    lost = _lose_answers(monkeypatch, 1)
    study.tell(trial, 0.5)
    assert lost and study.trials[0].state == State.COMPLETE and study.trials[0].value == 0.5
    # Claiming a queued trial: ours, not "another worker took it" (which would strand it RUNNING).
    study.enqueue_trial({"x": 0.25})
    lost = _lose_answers(monkeypatch, 1)
    claimed = study.ask()
    assert lost and claimed.number == 1 and len(study.trials) == 2
    # Two workers fail the same stale trial: one wins, so one retry is queued, not two.
    other = S.make_storage(postgres.url, FaultTolerance(**FAULTS))
    lost = _lose_answers(monkeypatch, 1)
    assert storage.set_trial_state_values(claimed._trial_id, State.FAIL) is True and lost
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        other.set_trial_state_values(claimed._trial_id, State.FAIL)


SWEEP_PG = dict(SWEEP, study="restarted", n_trials=3, sampler={"name": "random"},
                fault_tolerance={"heartbeat_s": 1, "grace_s": 10, "max_retries": 1})


@pytest.mark.slow
def test_two_drivers_ride_out_a_postgresql_restart(tmp_path, harness_cache, postgres):
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(SWEEP_PG))
    procs = [join(tmp_path / "s.yaml", postgres.url, tmp_path / f"results-{i}") for i in range(2)]
    try:
        def running():
            return [t for t in trials_of("restarted", postgres.url) if t.state == State.RUNNING]

        # Into training (each running trial's process known to its driver): the drivers record
        # those trials' milestones while the server is down.
        assert wait_for(lambda: (len(running()) == 2 or (running() and len(trials_of("restarted", postgres.url)) > 2))
                        and all("pid" in t.user_attrs for t in running())), "no trial ran"
        restarted_at = datetime.now()
        spanning = {t.number for t in running()}
        postgres.restart()
        def spanning_recorded():
            # The trials that ran through the restart have ended in the storage (their drivers wrote
            # them once the server was back). A trial quicker than the polling is no race here.
            trials = [t for t in trials_of("restarted", postgres.url) if t.number in spanning]
            return len(trials) == len(spanning) and all(t.state.is_finished() for t in trials)

        assert wait_for(spanning_recorded, timeout=120)
        postgres.restart(down_s=3)  # and once more with the server gone for a while
        for p in procs:
            finish(p)
    finally:
        for p in procs:
            p.kill()

    study = optuna.load_study(study_name="restarted", storage=postgres.url)
    trials = study.trials
    n = SWEEP_PG["n_trials"]
    assert [t.number for t in trials] == list(range(n)), "no trial lost, none created twice"
    assert all(t.state in (State.COMPLETE, State.PRUNED) for t in trials), {t.number: t.state for t in trials}
    assert len({t.params["learning_rate"] for t in trials}) == n, "no parameter set ran twice"
    assert any(t.datetime_start < restarted_at < t.datetime_complete for t in trials if t.number in spanning)
    results = [p for i in range(2) for p in (tmp_path / f"results-{i}" / "restarted" / "trials").glob("*/result.json")]
    assert sorted(int(p.parent.name) for p in results) == list(range(n)), "each trial ran once"
    assert_whole(study, n)
    # The tables rebuild from the storage alone, on any host: into an empty folder.
    elsewhere = tmp_path / "elsewhere" / "restarted"
    elsewhere.mkdir(parents=True)
    proc = run_cli("report", str(elsewhere), "--storage", postgres.url, "--no-figures")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rebuilt = pl.read_parquet(elsewhere / "trials.parquet")
    assert rebuilt["number"].to_list() == list(range(n)) and rebuilt["val_loss"].null_count() == 0
    assert set(pl.read_parquet(tmp_path / "results-0" / "restarted" / "trials.parquet").columns) <= set(rebuilt.columns)
