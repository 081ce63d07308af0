"""The fault-injection suite: real failures (harness.faults' HARNESS_FAULTS hook, a SIGKILLed
driver, Ctrl-C, a memory budget) against a real study. No trial may be lost.

It prints its figure (``test_figure``): faults injected, faults survived, trials lost, read from
the recorded study alone.
"""

import os
import signal
import subprocess
import sys

import optuna
import polars as pl
import pytest
import yaml

from conftest import ROOT, table_row, wait_for

pytestmark = [pytest.mark.timeout(900), pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
State = optuna.trial.TrialState

SWEEP = {
    "study": "faults", "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
    "dataset": {"source": "shakespeare", "max_val_rows": 16}, "max_seq_length": 64,
    "budget": {"max_steps": 6, "eval_every": 3, "hang_timeout_s": 8},
    "search_space": {"batch_size": 4, "learning_rate": {"low": 1e-3, "high": 1e-2, "log": True}, "lora_r": 4},
    "sampler": {"name": "random"}, "pruner": {"name": "none"}, "n_trials": 8,
    "fault_tolerance": {"heartbeat_s": 1, "grace_s": 3, "max_retries": 1}, "wandb": {"mode": "offline"},
}
TRIAL_FAULTS = "1:sigkill@2,2:segfault@2,3:nan@2,4:hang@2,5:oom@2,6:wandb@1"


def cli(*args, env=None, **kw):
    return [sys.executable, "-m", "harness.cli", *args], dict(os.environ, **(env or {}))


def run(args, env=None, timeout=600):
    cmd, env = cli(*args, env=env)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def load(study_dir):
    return optuna.load_study(study_name=study_dir.name, storage=f"sqlite:///{study_dir / 'study.db'}")


def running_pid(study_dir, number) -> int | None:
    """The process running trial ``number``, once the driver knows it."""
    try:
        trial = next((t for t in load(study_dir).trials if t.number == number and t.state == State.RUNNING), None)
    except Exception:  # noqa: BLE001 - the storage or the study is not there yet
        return None
    return trial.user_attrs.get("pid") if trial is not None else None


def survivals(study_dir) -> dict[str, bool]:
    """Each injected trial fault, and whether the study recorded it for what it was and went on."""
    trials = {t.number: t for t in load(study_dir).trials}
    attrs = {n: t.user_attrs for n, t in trials.items()}
    reason = {n: a.get("reason", "") for n, a in attrs.items()}
    log6 = (study_dir / "trials" / "6" / "log.txt").read_text()
    return {
        "sigkill": trials[1].state == State.FAIL and attrs[1]["outcome"] == "crash" and "killed by signal 9" in reason[1],
        "segfault": trials[2].state == State.FAIL and "killed by signal 11" in reason[2],
        "nan": trials[3].state == State.FAIL and reason[3].startswith("nonfinite_loss: loss became nan"),
        "hang": trials[4].state == State.FAIL and reason[4].startswith("hang: no progress for 8 s"),
        "oom": (trials[5].state == State.COMPLETE and trials[5].constraints == {"oom": 1.0}
                and attrs[5]["outcome"] == "oom" and attrs[5]["mem_at_failure_mib"] > 0
                and "can't allocate memory" in attrs[5]["oom_error"]),
        "wandb": (trials[6].state == State.COMPLETE and "W&B log for trial 6 failed, continuing without it: "
                  "OSError: [Errno 28] No space left on device" in log6),
    }


@pytest.fixture(scope="module")
def faulty_study(tmp_path_factory, harness_cache):
    root = tmp_path_factory.mktemp("faults")
    (root / "faults.yaml").write_text(yaml.safe_dump(SWEEP))
    proc = run(["run", str(root / "faults.yaml"), "--results-dir", str(root / "results")],
               env={"HARNESS_FAULTS": TRIAL_FAULTS})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, root / "results" / "faults", proc


def test_each_trial_fault_is_recorded_with_its_reason_and_the_driver_goes_on(faulty_study):
    _, study_dir, _ = faulty_study
    trials = {t.number: t for t in load(study_dir).trials}
    assert sorted(trials) >= list(range(8))
    assert survivals(study_dir) == {kind: True for kind in ("sigkill", "segfault", "nan", "hang", "oom", "wandb")}
    # The log's last lines come with each reason.
    assert "Traceback" in trials[3].user_attrs["reason"] or "NonFiniteLoss" in trials[3].user_attrs["reason"]
    for n in (0, 6, 7):
        assert trials[n].state == State.COMPLETE and trials[n].user_attrs["outcome"] == "complete"


def test_out_of_memory_is_infeasible_not_best_and_reported(faulty_study):
    _, study_dir, _ = faulty_study
    study = load(study_dir)
    assert study.best_trial.number != 5  # infeasible trials are never best
    df = pl.read_parquet(study_dir / "trials.parquet")
    row = df.filter(pl.col("number") == 5).row(0, named=True)
    assert row["outcome"] == "oom" and row["feasible"] is False and row["val_loss"] is None
    summary = (study_dir / "summary.md").read_text()
    assert "## Infeasible trials" in summary and "## Failed trials" in summary and table_row(summary, 4, "hang")


def test_a_killed_driver_is_resumed_without_losing_or_repeating(tmp_path, harness_cache):
    sweep = dict(SWEEP, study="killed", n_trials=3)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    args = ["run", str(tmp_path / "s.yaml"), "--results-dir", str(tmp_path / "results")]
    study_dir = tmp_path / "results" / "killed"
    # Trial 1 hangs (a hang the driver will not see: the driver dies first).
    cmd, env = cli(*args, env={"HARNESS_FAULTS": "1:hang@1"})
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: running_pid(study_dir, 1) is not None), "trial 1 never started"
    finally:
        driver.send_signal(signal.SIGKILL)
        driver.wait()
    # The trial process dies with its driver: no orphan trains on.
    pid = running_pid(study_dir, 1)
    assert wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=30), f"trial 1 (pid {pid}) outlived its driver"
    again = run(args)  # the same command, as a user would type it again
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    study = load(study_dir)
    trials = {t.number: t for t in study.trials}
    retry = next(t for t in trials.values() if optuna.storages.RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == 1)
    assert trials[1].state == State.FAIL and trials[1].user_attrs["outcome"] == "stale"
    assert retry.state == State.COMPLETE and retry.params == trials[1].params
    assert not [t for t in trials.values() if t.state in (State.RUNNING, State.WAITING)]
    from harness.sweep.study import counted_trials, finished_count

    assert counted_trials(study) == finished_count(study) == 3  # n_trials holds over the whole study
    df = pl.read_parquet(study_dir / "trials.parquet")
    assert df.height == 4 and df.filter(pl.col("number") == 1)["outcome"].item() == "stale"
    # Once more: nothing to do, nothing runs twice.
    assert run(args).returncode == 0 and len(load(study_dir).trials) == 4


def test_ctrl_c_marks_the_trial_and_writes_the_tables(tmp_path, harness_cache):
    sweep = dict(SWEEP, study="interrupted", n_trials=3)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    cmd, env = cli("run", str(tmp_path / "s.yaml"), "--results-dir", str(tmp_path / "results"),
                   env={"HARNESS_FAULTS": "1:hang@1"})
    driver = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    study_dir = tmp_path / "results" / "interrupted"
    assert wait_for(lambda: running_pid(study_dir, 1) is not None)
    driver.send_signal(signal.SIGINT)
    out, _ = driver.communicate(timeout=120)
    trials = load(study_dir).trials
    assert driver.returncode == 130, out
    assert trials[0].state == State.COMPLETE and trials[1].state == State.FAIL, out
    assert trials[1].user_attrs["outcome"] == "interrupted" and (study_dir / "trials.parquet").exists()
    assert "interrupted" in (study_dir / "summary.md").read_text()
    # The same command again: the interrupted trial's parameters run again in its place, and it
    # does not count towards n_trials.
    again = run(["run", str(tmp_path / "s.yaml"), "--results-dir", str(tmp_path / "results")])
    assert again.returncode == 0, again.stdout + again.stderr
    trials = load(study_dir).trials
    done = [t for t in trials if t.state == State.COMPLETE]
    assert len(done) == 3 and len(trials) == 4, [(t.number, t.state) for t in trials]
    assert trials[2].params == trials[1].params and trials[2].system_attrs["failed_trial"] == 1
    assert not list((study_dir / "wandb").rglob("*.wandb")) or all(
        f.stat().st_size > 7 for f in (study_dir / "wandb").rglob("*.wandb")), "no empty W&B run is left"


def test_a_trial_that_dies_before_training_is_retried_and_not_counted(tmp_path, harness_cache):
    sweep = dict(SWEEP, study="infra", n_trials=2)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    proc = run(["run", str(tmp_path / "s.yaml"), "--results-dir", str(tmp_path / "results")],
               env={"HARNESS_FAULTS": "0:sigkill@0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    trials = load(tmp_path / "results" / "infra").trials
    assert [t.state for t in trials] == [State.FAIL, State.COMPLETE, State.COMPLETE]
    assert trials[0].user_attrs["outcome"] == "infrastructure" and trials[1].params == trials[0].params
    assert "ended before training" in trials[0].user_attrs["reason"]
    assert "[harness] trial 0: process" in trials[0].user_attrs["reason"]  # the log's tail is in the reason
    assert "it will run again" in proc.stdout


def test_a_study_whose_trials_cannot_run_stops_and_exits_non_zero(tmp_path, harness_cache):
    sweep = dict(SWEEP, study="broken", n_trials=4)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    proc = run(["run", str(tmp_path / "s.yaml"), "--results-dir", str(tmp_path / "results")],
               env={"HARNESS_FAULTS": "*:sigkill@0"})
    trials = load(tmp_path / "results" / "broken").trials
    # The first trial and its one retry (max_retries: 1) died before training: no more are tried.
    assert proc.returncode == 1 and len(trials) == 2 and all(t.state == State.FAIL for t in trials), proc.stdout
    assert "could not get to train" in proc.stdout and "killed by signal 9" in proc.stdout
    assert (tmp_path / "results" / "broken" / "summary.md").exists(), "the tables are written all the same"


def test_memory_budget_makes_a_trial_infeasible(tmp_path, harness_cache):
    sweep = dict(SWEEP, study="budget", n_trials=1, memory_budget_mib=100)
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    proc = run(["run", str(tmp_path / "s.yaml"), "--results-dir", str(tmp_path / "results")])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    t = load(tmp_path / "results" / "budget").trials[0]
    assert t.state == State.COMPLETE and t.user_attrs["outcome"] == "over_budget"
    assert t.constraints["memory_budget"] == pytest.approx(t.user_attrs["peak_mem_mib"] - 100)
    assert "over the memory budget: infeasible" in proc.stdout


def test_figure(faulty_study, capsys):
    """The suite's figure, from the recorded study alone (in any order, alone or not)."""
    _, study_dir, _ = faulty_study
    study = load(study_dir)
    lost = [t.number for t in study.trials if t.state in (State.RUNNING, State.WAITING)]
    survived = survivals(study_dir)
    with capsys.disabled():
        print(f"\nfault injection: {len(survived)} faults injected, {sum(survived.values())} survived, "
              f"{len(lost)} trials lost")
    assert not lost and all(survived.values()) and len(survived) == len(TRIAL_FAULTS.split(","))
