"""A driver taken back by its scheduler: SIGTERM mid-training (what Slurm's ``--signal=B:TERM``, a
preemption or a pod's deletion sends first). The driver starts nothing more, records its running
trial as interrupted (queued again, not counted), ends it, and exits 143 well inside a grace
period; its parameters wait, queued, to run first."""

import os
import signal
import subprocess
import sys

import optuna
import pytest
import yaml

from conftest import ROOT, wait_for
from test_faults import SWEEP, load, running_pid

pytestmark = [pytest.mark.timeout(300), pytest.mark.slow,
              pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]
State = optuna.trial.TrialState


def test_sigterm_interrupts_the_running_trial_and_queues_it_first(tmp_path, harness_cache):
    # A long hang timeout: the hang below is the trial's training, which only the SIGTERM ends.
    sweep = dict(SWEEP, study="preempted", n_trials=2, budget={**SWEEP["budget"], "hang_timeout_s": 120})
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(sweep))
    args = [sys.executable, "-m", "harness.cli", "run", str(tmp_path / "s.yaml"), "--results-dir",
            str(tmp_path / "results")]
    study_dir = tmp_path / "results" / "preempted"
    # Trial 0 stays in training (it would hang for ever after step 4), so the SIGTERM finds it running.
    driver = subprocess.Popen(args, cwd=ROOT, env=dict(os.environ, HARNESS_FAULTS="0:hang@4"),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: running_pid(study_dir, 0) is not None), "trial 0 never started"
        # In training: its first validation (step 3) recorded; it hangs after step 4.
        assert wait_for(lambda: 3 in load(study_dir).trials[0].intermediate_values, timeout=120)
        trial_pid = running_pid(study_dir, 0)
        driver.send_signal(signal.SIGTERM)
        # It ends without waiting for its trial: that trial hangs until the 120 s hang timeout. (How
        # soon it ends is a timing, not asserted here: about a second on this machine.)
        out, _ = driver.communicate(timeout=60)
    finally:
        driver.kill()
    assert driver.returncode == 143, out
    assert "terminated (SIGTERM)" in out
    assert wait_for(lambda: not os.path.exists(f"/proc/{trial_pid}"), timeout=10), "the trial outlived its driver"
    trials = load(study_dir).trials
    assert [t.state for t in trials] == [State.FAIL, State.WAITING], [(t.number, t.state) for t in trials]
    assert trials[0].user_attrs["outcome"] == "interrupted" and "SIGTERM" in trials[0].user_attrs["reason"]
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == 0

    # Its parameters are queued: the next driver to ask (another task of the array, a requeued one,
    # the same command again) runs them first (tests/test_faults.py's Ctrl-C test runs them, and
    # tests/test_slurm.py on a real Slurm).
    from harness.sweep.study import counted_trials

    assert counted_trials(load(study_dir)) == 1, "the interrupted trial does not count"


def test_sigterm_as_a_trial_is_asked_for_leaves_no_trial_running(tmp_path, harness_cache):
    # The driver takes SIGTERM just after it has asked the study for trial 0 and before it starts it
    # (the ``sigterm`` fault waits for the driver to stop): that trial is recorded as interrupted and
    # queued again, not left RUNNING for another driver to find stale once its heartbeat stops.
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(dict(SWEEP, study="taken-between", n_trials=2)))
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(tmp_path / "s.yaml"), "--results-dir",
                          str(tmp_path / "results")], cwd=ROOT, env=dict(os.environ, HARNESS_FAULTS="0:sigterm"),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 143, out.stdout + out.stderr
    trials = load(tmp_path / "results" / "taken-between").trials
    assert [t.state for t in trials] == [State.FAIL, State.WAITING], [(t.number, t.state, t.user_attrs, t.system_attrs) for t in trials]
    assert trials[0].user_attrs["outcome"] == "interrupted" and "SIGTERM" in trials[0].user_attrs["reason"]
    assert trials[1].params == trials[0].params and trials[1].system_attrs["failed_trial"] == 0
