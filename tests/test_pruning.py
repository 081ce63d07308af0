"""Pruning in multi-objective studies (harness/sweep/pruning.py): the loss rule at equal data and
the dominance rule, on rule inputs and on a real Optuna study's records."""

import optuna
import pytest

from harness.sweep import pruning
from harness.sweep.pruning import Finished, dominance_rule, loss_rule, optimistic_final_loss

SPEED_AND_MEMORY = {"tokens_per_s": "maximize", "peak_mem_mib": "minimize"}
# Two finished trials: 0 is fast and small, 1 is slower and larger but ends at a similar loss.
FINISHED = [Finished(0, {100: 5.0, 200: 4.5}, 4.5, 1000.0, 500.0),
            Finished(1, {100: 5.2, 200: 4.6}, 4.6, 800.0, 900.0)]


def test_loss_rule_prunes_behind_the_median_at_the_same_milestone():
    assert loss_rule(FINISHED, 100, 5.3, n_startup=2, n_warmup=0).prune  # median 5.1
    assert not loss_rule(FINISHED, 100, 5.05, n_startup=2, n_warmup=0).prune
    assert not loss_rule(FINISHED, 100, 9.0, n_startup=3, n_warmup=0).prune, "fewer complete trials than n_startup"
    assert not loss_rule(FINISHED, 100, 9.0, n_startup=2, n_warmup=150).prune, "before n_warmup_steps"
    assert not loss_rule(FINISHED, 150, 9.0, n_startup=2, n_warmup=0).prune, "no trial reported at this milestone"


def test_optimistic_final_loss_takes_the_largest_improvement_seen_from_here():
    # Trial 0 gained 0.5 from milestone 100 to its end, trial 1 gained 0.6.
    assert optimistic_final_loss(FINISHED, 100, 5.5) == pytest.approx(4.9)
    assert optimistic_final_loss(FINISHED, 200, 4.7) == pytest.approx(4.7)


def test_dominated_when_slower_larger_and_unable_to_beat_the_loss():
    d = dominance_rule(FINISHED, SPEED_AND_MEMORY, 100, 5.5, tokens_per_s=500.0, peak_mem_mib=600.0)
    assert d.prune and d.rule == "dominance" and "trial 0" in d.reason


def test_not_dominated_while_it_could_still_reach_a_better_loss():
    # Best case 4.9 - 0.6 = 4.3 < 4.5: it could still end on the front.
    assert not dominance_rule(FINISHED, SPEED_AND_MEMORY, 100, 4.9, 500.0, 600.0).prune


def test_not_dominated_when_faster_or_smaller_than_every_finished_trial():
    assert not dominance_rule(FINISHED, SPEED_AND_MEMORY, 100, 5.5, tokens_per_s=2000.0, peak_mem_mib=600.0).prune
    assert not dominance_rule(FINISHED, SPEED_AND_MEMORY, 100, 5.5, tokens_per_s=500.0, peak_mem_mib=100.0).prune


def test_only_the_studys_objectives_count():
    # Memory alone: trial 0 is smaller, and its loss cannot be beaten: dominated whatever its speed.
    assert dominance_rule(FINISHED, {"peak_mem_mib": "minimize"}, 100, 5.5, 5000.0, 600.0).prune
    # Speed alone: this trial is the fastest: not dominated, whatever its memory.
    assert not dominance_rule(FINISHED, {"tokens_per_s": "maximize"}, 100, 5.5, 5000.0, 99999.0).prune


def test_no_speed_measured_yet_means_no_verdict():
    assert not dominance_rule(FINISHED, SPEED_AND_MEMORY, 100, 9.9, tokens_per_s=None, peak_mem_mib=600.0).prune


def _study_with_finished_trials() -> optuna.Study:
    study = optuna.create_study(directions=["minimize", "maximize", "minimize"])
    dists = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}
    for number, (curve, speed, mem) in enumerate([({100: 5.0, 200: 4.5}, 1000.0, 500.0),
                                                  ({100: 5.2, 200: 4.6}, 800.0, 900.0)]):
        study.add_trial(optuna.trial.create_trial(
            params={"lr": 1e-3 * (number + 1)}, distributions=dists, values=[curve[200], speed, mem],
            user_attrs={"val_loss": curve[200], "tokens_per_s": speed, "peak_mem_mib": mem,
                        "curve": {str(k): v for k, v in curve.items()}}))
    # An infeasible trial (over the memory budget) never dominates anyone.
    study.add_trial(optuna.trial.create_trial(
        params={"lr": 5e-3}, distributions=dists, values=[float("inf"), float("-inf"), float("inf")],
        user_attrs={"val_loss": 1.0, "tokens_per_s": 1e9, "peak_mem_mib": 1.0, "curve": {"100": 1.0, "200": 1.0}},
        system_attrs={"constraints:memory_budget": 1.0}))
    return study


def test_decide_reads_finished_trials_from_the_study():
    study = _study_with_finished_trials()
    finished = pruning.finished_trials(study)
    assert [f.number for f in finished] == [0, 1], "the infeasible trial is left out"
    assert finished[0].losses == {100: 5.0, 200: 4.5}
    d = pruning.decide(study, SPEED_AND_MEMORY, 100, 5.5, 500.0, 600.0, n_startup=5, n_warmup=0)
    assert d.prune and d.rule == "dominance"
    d = pruning.decide(study, SPEED_AND_MEMORY, 100, 5.3, 5000.0, 100.0, n_startup=2, n_warmup=0)
    assert d.prune and d.rule == "loss"
    assert not pruning.decide(study, SPEED_AND_MEMORY, 100, 4.9, 5000.0, 100.0, n_startup=2, n_warmup=0).prune
