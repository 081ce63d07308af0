"""Resident workers (``harness warm up``), on CPU: studies borrow them and give them back (a warm
one with its base kept); their trials' numbers equal those of trials in a study's own workers; a
busy one is not shared; a silent client does not block one; a killed driver takes a warm trial's
worker with it and the supervisor starts another; ``harness warm down`` leaves no process."""

import os
import signal
import socket
import subprocess
import sys

import optuna
import pytest
import yaml

from conftest import ROOT, run_cli, wait_for
from test_warm import GRID

pytestmark = pytest.mark.timeout(900)


def _status() -> dict:
    from harness.launch import resident

    return {g: resident.status(g) for g in resident.known_gpus()}


def _sweep(tmp_path, name: str, **keys) -> str:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(dict(GRID, study=name, **keys)))
    return str(path)


def _study(tmp_path, name: str) -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'r' / name / 'study.db'}")


@pytest.fixture
def warm_resident(private_cache):
    """A warm-mode resident worker (the GPU default) on a cache of the test's own."""
    up = run_cli("warm", "up", "--mode", "warm", "--timeout", "240")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert "cpu: started, idle" in up.stdout
        yield _status()["cpu"]
    finally:
        run_cli("warm", "down")


@pytest.mark.slow
def test_studies_borrow_a_resident_worker_and_get_the_same_numbers(tmp_path, warm_resident):
    worker_pid = warm_resident.worker["pid"]
    assert warm_resident.worker["mode"] == "warm"
    # A silent client (a stray connection) is dropped after a few seconds: it blocks no study.
    stray = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    from harness.launch.resident import log_path, socket_path

    stray.connect(str(socket_path("cpu")))
    try:
        for name, method in (("first", "warm"), ("second", "warm"), ("own", "fork")):
            out = run_cli("run", _sweep(tmp_path, name, n_trials=3, start_method=method), "--results-dir",
                          str(tmp_path / "r"))
            assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    finally:
        stray.close()
    assert "dropped a client that sent nothing" in log_path("cpu").read_text()
    first, second, own = (_study(tmp_path, n) for n in ("first", "second", "own"))
    trials = first.trials + second.trials
    # One process ran both studies' trials, the base loaded once (the first study's preload) and
    # kept; its import is counted once, on its very first trial.
    assert {t.user_attrs["pid"] for t in trials} == {worker_pid}
    assert [t.user_attrs["worker_trial"] for t in trials] == list(range(1, 7))
    assert all(t.user_attrs["resident_worker"] is True and t.user_attrs["base_reused"] is True for t in trials)
    assert trials[0].user_attrs["preimport_s"] > 0 and all("preimport_s" not in t.user_attrs for t in trials[1:])
    # The fork study did not borrow the warm resident worker: its own worker forked each trial.
    assert all("resident_worker" not in t.user_attrs and t.user_attrs["start_method"] == "fork" for t in own.trials)
    by_params = {tuple(sorted(t.params.items())): t for t in own.trials}
    for t in trials:
        twin = by_params[tuple(sorted(t.params.items()))]
        assert t.value == pytest.approx(twin.value, abs=1e-6), (t.number, t.params)
        # Measured again by each study's first trial: another study may validate on other rows.
        assert t.user_attrs["val_loss_start"] == pytest.approx(twin.user_attrs["val_loss_start"], abs=1e-6)
    assert [r["resident_slots"] for r in first.user_attrs["sweep_runs"]] == [1]
    assert "slots borrowed resident workers" in (tmp_path / "r" / "second" / "summary.md").read_text()
    assert _status()["cpu"].worker["studies"] == 2

    # A resident worker serves one study at a time: while another holds it, a study starts its own.
    from harness.launch.workers import ResidentWorker

    holder = ResidentWorker.borrow("cpu", tmp_path, dict(os.environ), fork=False)
    assert holder is not None and holder.pid == worker_pid
    try:
        out = run_cli("run", _sweep(tmp_path, "busy", n_trials=2, start_method="warm"), "--results-dir", str(tmp_path / "r"))
        assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    finally:
        holder.close()
    busy = _study(tmp_path, "busy")
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in busy.trials)
    assert all(t.user_attrs["pid"] != worker_pid and "resident_worker" not in t.user_attrs for t in busy.trials)
    assert busy.user_attrs["sweep_runs"][0]["resident_slots"] == 0
    assert wait_for(lambda: _status()["cpu"].state == "idle", 30)


@pytest.mark.slow
def test_a_killed_driver_ends_its_trial_and_the_worker_is_replaced(tmp_path, warm_resident):
    worker_pid, supervisor = warm_resident.worker["pid"], warm_resident.supervisor
    sweep = _sweep(tmp_path, "hung", n_trials=2, start_method="warm")
    env = dict(os.environ, HARNESS_FAULTS="0:hang@2")
    driver = subprocess.Popen([sys.executable, "-m", "harness.cli", "run", sweep, "--results-dir", str(tmp_path / "r")],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    db = tmp_path / "r" / "hung" / "study.db"

    def trial_running_in_worker() -> bool:
        try:
            return any(t.user_attrs.get("pid") == worker_pid for t in _study(tmp_path, "hung").trials)
        except Exception:  # noqa: BLE001 - the study is not created yet
            return False

    try:
        assert wait_for(lambda: db.exists() and trial_running_in_worker(), 240), "trial 0 never reached the worker"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # The trial does not outlive its driver: the worker ends, and its supervisor starts another.
    assert wait_for(lambda: not _pid_alive(worker_pid), 30), "the hung trial's worker outlived its driver"
    assert wait_for(lambda: _status()["cpu"].state == "idle", 240)
    new = _status()["cpu"]
    assert new.supervisor == supervisor and new.worker["pid"] != worker_pid and new.worker["trials"] == 0

    down = run_cli("warm", "down")
    assert down.returncode == 0 and "stopped: cpu" in down.stdout, down.stdout + down.stderr
    for pid in (supervisor, new.worker["pid"]):
        assert not _pid_alive(pid)
    assert not _status(), "nothing is left registered"
    status = run_cli("warm", "status")
    assert "no resident worker" in status.stdout


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (not yet reaped) counts as ended.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def test_warm_up_rejects_bad_input():
    out = run_cli("warm", "up", "--gpus", "0,1")  # no NVIDIA device on the test machine
    assert out.returncode == 2 and "--gpus 0,1" in out.stdout
    out = run_cli("warm", "up", "--max-trials", "0")
    assert out.returncode == 2 and "--max-trials must be > 0" in out.stdout


def test_a_gpu_pool_shares_the_host_cores_out(monkeypatch):
    from harness.sweep import driver

    monkeypatch.setattr(driver, "nvidia_visible", lambda: True)
    monkeypatch.setattr(driver.os, "cpu_count", lambda: 32)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert {s: e["OMP_NUM_THREADS"] for s, e in driver._slots([0, 1], 1).items()} == {"0": "16", "1": "16"}
    assert {s: e["OMP_NUM_THREADS"] for s, e in driver._slots([0, 1, 2, 3], 2).items()} == {"0,1": "8", "2,3": "8"}
    assert "OMP_NUM_THREADS" not in driver._slots([3], 1)["3"]  # one process has the host to itself
    monkeypatch.setenv("OMP_NUM_THREADS", "4")  # the user's own setting wins
    assert all("OMP_NUM_THREADS" not in e for e in driver._slots([0, 1], 1).values())
