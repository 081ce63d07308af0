"""How a trial ended, decided in one place (harness.sweep.outcome) from the worker's report and
the launcher's facts about the process; and the channel they travel on (harness.protocol)."""

import socket
import typing

import pytest

from harness.protocol import Channel, Closed
from harness.records import OUTCOME_STATE, Metrics, Outcome, SeedRun, TrialReport
from harness.sweep import outcome
from harness.sweep.config import SweepConfig

BASE = {"study": "s", "model": {"name": "tiny-mistral"}, "budget": {"tokens": 1000, "eval_every": 500}}
END = outcome.ProcessEnd(code=0, reached_training=True, start_method="fork", log_tail="last lines\n")


def cfg(**keys) -> SweepConfig:
    return SweepConfig.model_validate({**BASE, **keys})


def run(seed: int, losses: list[float], stopped_by=None, train_s=2.0) -> SeedRun:
    history = [{"milestone": 500 * (i + 1), "val_loss": v, "tokens": 500 * (i + 1), "seconds": 1.0 * (i + 1)}
               for i, v in enumerate(losses)]
    return SeedRun(seed=seed, val_loss=losses[-1], stopped_by=stopped_by, history=history, train_s=train_s)


def report(*runs: SeedRun, **metrics) -> TrialReport:
    return TrialReport(number=3, runs=list(runs), metrics=Metrics(budget=1000, **metrics), reached_training=True)


def test_every_outcome_has_a_state_and_the_type_names_them_all():
    assert set(OUTCOME_STATE) == set(typing.get_args(Outcome))
    assert {OUTCOME_STATE[o] for o in ("infrastructure", "interrupted", "stale")} == {"fail"}


def test_a_process_that_ended_without_a_report():
    crashed = outcome.decide(3, None, outcome.ProcessEnd(code=-9, reached_training=True, log_tail="x\n"), cfg())
    assert crashed.outcome == "crash" and "killed by signal 9" in crashed.reason and crashed.reason.endswith("x\n")
    hung = outcome.decide(3, None, outcome.ProcessEnd(code=-9, hung=True, hang_timeout_s=8, reached_training=True), cfg())
    assert hung.outcome == "hang" and hung.reason.startswith("hang: no progress for 8 s")
    early = outcome.decide(3, None, outcome.ProcessEnd(code=1), cfg())
    assert early.outcome == "infrastructure" and early.retried and "ended before training (crash" in early.reason
    assert early.number == hung.number == 3


def test_a_signal_from_the_user_or_the_scheduler_is_an_interruption_not_a_crash():
    import signal

    ctrl_c = outcome.decide(3, None, outcome.ProcessEnd(code=-signal.SIGINT, reached_training=True), cfg())
    assert ctrl_c.outcome == "interrupted" and "Ctrl-C" in ctrl_c.reason
    for end in (outcome.ProcessEnd(code=-signal.SIGTERM, reached_training=True),
                outcome.ProcessEnd(code=-9, reached_training=True, taken_back=True)):
        taken = outcome.decide(3, None, end, cfg())
        assert taken.outcome == "interrupted" and taken.reason == outcome.TAKEN_BACK
    # A SIGKILL with no SIGTERM to its driver stays a crash.
    assert outcome.decide(3, None, outcome.ProcessEnd(code=-9, reached_training=True), cfg()).state == "fail"


def test_a_report_of_an_exception():
    oom = report(oom_error="CUDA out of memory")
    oom.failure, oom.reason = "oom", "CUDA out of memory"
    r = outcome.decide(3, oom, END, cfg())
    assert r.outcome == "oom" and r.state == "infeasible" and r.reason == "out of memory: CUDA out of memory"
    nan = report()
    nan.failure, nan.reason = "nonfinite_loss", "nonfinite_loss: loss became nan at step 3"
    r = outcome.decide(3, nan, END, cfg())
    assert r.outcome == "nonfinite_loss" and r.reason.startswith("nonfinite_loss: loss became nan") and "last lines" in r.reason
    early = report()
    early.failure, early.reason, early.reached_training = "error", "OSError: no model", False
    assert outcome.decide(3, early, END, cfg()).outcome == "infrastructure"


def test_complete_over_seeds_and_several_objectives():
    r = outcome.decide(3, report(run(0, [3.0, 2.0]), run(1, [3.0, 2.5])), END, cfg(seeds=2))
    assert r.outcome == "complete" and r.value == pytest.approx(2.25) and r.metrics.seed_values == [2.0, 2.5]
    assert r.metrics.value_std == pytest.approx(0.3535534) and r.metrics.best_val_loss == 2.0
    multi = cfg(objectives=[{"metric": "val_loss"}, {"metric": "tokens_per_s"}, {"metric": "peak_mem_mib"}])
    r = outcome.decide(3, report(run(0, [3.0, 2.0]), tokens_per_s=100.0, peak_mem_mib=512.0), END, multi)
    assert r.values == [2.0, 100.0, 512.0]


def test_pruned_by_the_drivers_decision_with_the_time_it_saved():
    pruned = outcome.Pruning("median", "behind the median")
    r = outcome.decide(3, report(run(0, [3.0], stopped_by="pruned", train_s=2.0)), END, cfg(), pruned)
    assert r.outcome == "pruned" and r.value == 3.0 and r.pruned_by == "median" and r.reason == "behind the median"
    assert r.metrics.pruning_saved_s == pytest.approx(2.0)  # half the budget done in 2 s: 2 s more it would have taken


def test_time_to_target_and_the_memory_budget():
    ttt = cfg(objective={"metric": "time_to_target", "target": 2.5, "measure": "tokens"})
    r = outcome.decide(3, report(run(0, [3.0, 2.4], stopped_by="converged")), END, ttt)
    assert r.outcome == "complete" and r.value == 1000 and r.metrics.time_to_target == 1000
    r = outcome.decide(3, report(run(0, [3.0, 2.6])), END, ttt)
    assert r.outcome == "not_converged" and r.state == "infeasible" and "best 2.6000" in r.reason
    r = outcome.decide(3, report(run(0, [3.0, 2.0]), peak_mem_mib=900.0), END, cfg(memory_budget_mib=800))
    assert r.outcome == "over_budget" and "900 MiB is over memory_budget_mib 800" in r.reason


def test_the_outcomes_no_process_witnesses():
    assert outcome.predicted_oom(4, "predicted 90 GiB").state == "infeasible"
    assert outcome.interrupted(4).retried and outcome.stale(4, 30).retried
    assert "30 s" in outcome.stale(4, 30).reason


def test_the_channel_carries_json_lines_and_says_when_the_other_end_is_gone():
    a, b = socket.socketpair()
    left, right = Channel(a), Channel(b)
    assert right.recv(0.05) is None  # nothing yet
    left.send("step", step=1, loss=2.5)
    a.sendall(b'{"kind": "torn"\n{"no kind": 1}\n')  # a line cut by a killed writer, and one without a kind
    left.send("eval", milestone=500)
    assert right.recv(1) == {"kind": "step", "step": 1, "loss": 2.5}
    assert right.recv(1) == {"kind": "eval", "milestone": 500}
    assert not right.peer_gone()
    left.close()
    assert right.peer_gone()
    with pytest.raises(Closed):
        right.recv(1)
    with pytest.raises(Closed):
        right.send("answer", stop=None)
