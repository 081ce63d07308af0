"""Concurrent trials (``concurrent_trials``), on CPU: trials trained together on one base give the
losses, curves and adapters they give alone; a trial that fails (a NaN) leaves alone and the next
trial takes its place, the others' numbers unchanged; nothing of one trial reaches the next in its
place; a pack's memory is predicted before it starts."""

import optuna
import pytest
import yaml

from conftest import run_cli

pytestmark = pytest.mark.timeout(1200)

# Five trials that differ in rank, batch size, accumulation and learning rate, in a fixed order.
CONFIGS = [{"batch_size": 2, "grad_accum": 1, "lora_r": 4, "learning_rate": 0.002},
           {"batch_size": 4, "grad_accum": 2, "lora_r": 8, "learning_rate": 0.006},
           {"batch_size": 2, "grad_accum": 2, "lora_r": 8, "learning_rate": 0.006},
           {"batch_size": 4, "grad_accum": 1, "lora_r": 4, "learning_rate": 0.002},
           {"batch_size": 4, "grad_accum": 2, "lora_r": 4, "learning_rate": 0.006}]
SWEEP = {
    "start_method": "warm", "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
    "dataset": {"source": "shakespeare", "max_val_rows": 16}, "max_seq_length": 64,
    "budget": {"tokens": 1500, "eval_every": 500},
    "search_space": {"batch_size": {"choices": [2, 4]}, "grad_accum": {"choices": [1, 2]},
                     "lora_r": {"choices": [4, 8]}, "learning_rate": {"choices": [0.002, 0.006]}},
    "sampler": {"name": "random"}, "pruner": {"name": "none"}, "n_trials": len(CONFIGS), "enqueue": CONFIGS,
}


def _study(tmp_path, name: str, faults: str = "", **keys) -> optuna.Study:
    import os

    (tmp_path / f"{name}.yaml").write_text(yaml.safe_dump({**SWEEP, "study": name, **keys}))
    os.environ["HARNESS_FAULTS"] = faults
    try:
        proc = run_cli("run", str(tmp_path / f"{name}.yaml"), "--results-dir", str(tmp_path / "r"), "--no-figures")
    finally:
        os.environ.pop("HARNESS_FAULTS", None)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'r' / name / 'study.db'}")


@pytest.mark.slow
def test_trials_trained_together_equal_the_same_trials_alone(tmp_path, harness_cache):
    # Alone: each trial in a fork of the session's resident worker (no import of its own; a warm
    # worker's numbers equal a fork's, tests/test_warm.py).
    alone = _study(tmp_path, "alone", start_method="fork")
    # Three at a time; trial 1's adapter turns NaN after its second step: it fails alone, and the
    # fourth trial takes its place at once.
    together = _study(tmp_path, "together", faults="1:nan@2", concurrent_trials=3)
    solo = {t.number: t for t in alone.trials}
    packed = {t.number: t for t in together.trials}
    assert [t.params for t in together.trials] == [t.params for t in alone.trials] == CONFIGS
    assert packed[1].state == optuna.trial.TrialState.FAIL and packed[1].user_attrs["outcome"] == "nonfinite_loss"
    for n in (0, 2, 3, 4):
        a, b = solo[n], packed[n]
        assert b.state == optuna.trial.TrialState.COMPLETE, b.user_attrs
        # The same curve as alone (float rounding apart), whatever shared its steps: the trial that
        # failed beside it, or the ones that came and went.
        assert b.value == pytest.approx(a.value, rel=1e-5), (n, a.value, b.value)
        assert sorted(b.intermediate_values) == sorted(a.intermediate_values)
        assert list(b.intermediate_values.values()) == pytest.approx(list(a.intermediate_values.values()), rel=1e-5)
        assert b.user_attrs["steps"] == a.user_attrs["steps"] and b.user_attrs["tokens_trained"] == a.user_attrs["tokens_trained"]
        assert b.user_attrs["val_loss_start"] == pytest.approx(a.user_attrs["val_loss_start"], rel=1e-6)
    attrs = {n: t.user_attrs for n, t in packed.items()}
    assert attrs[0]["pack_size_max"] == 3 and set(attrs[0]["shared_with"]) >= {1, 2}
    # Trial 1 failed at its second step: trial 3 started in its place while 0 and 2 still trained.
    assert {0, 2} <= set(attrs[3]["shared_with"]) and 1 not in attrs[3]["shared_with"]
    # One worker ran them all (a failure in a pack retires nothing), each trial on its own adapter.
    assert len({a["pid"] for a in attrs.values()}) == 1 and all(a["start_method"] == "warm" for a in attrs.values())
    assert all(a["trainable_params"] == solo[n].user_attrs["trainable_params"] for n, a in attrs.items() if n != 1)
    # The best trial's adapter, saved from its slot, reloads to its validation loss.
    best = together.best_trial
    proc = run_cli("eval", str(tmp_path / "r" / "together"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert float(proc.stdout.split("val_loss")[-1]) == pytest.approx(best.value, rel=1e-5)


def test_concurrent_trials_need_lora_trials_of_one_seed_on_warm_workers(tmp_path):
    from harness.errors import SweepFileError
    from harness.sweep.config import load_sweep

    for keys, why in (({"seeds": 2}, "seeds: 2"), ({"start_method": "fork"}, "start_method: fork"),
                      ({"search_space": {"method": {"choices": ["lora", "full"]}}}, "method: full"),
                      ({"search_space": {"packing": "padding_free"}}, "packing: padding_free")):
        path = tmp_path / "s.yaml"
        path.write_text(yaml.safe_dump({**SWEEP, "study": "x", "concurrent_trials": 4, **keys}))
        with pytest.raises(SweepFileError, match=why):
            load_sweep(path)


def test_a_packs_memory_is_the_shared_base_once_and_every_trials_own_parts():
    from harness.sweep.config import SweepConfig
    from harness.sweep.predict import SHARED_PARTS, architecture, pack_prediction, predict

    cfg = SweepConfig.model_validate({"study": "p", "model": {"name": "mistral-7b-v0.3", "dtype": "bfloat16"},
                                      "max_seq_length": 256, "search_space": {"batch_size": 2, "lora_r": 16}})
    arch = architecture(cfg, None)
    one = predict(cfg, {"batch_size": 2, "lora_r": 16}, arch)
    four = pack_prediction([one] * 4)
    own = one.total_mib - sum(one.parts.get(p, 0.0) for p in SHARED_PARTS)
    assert four.total_mib == pytest.approx(one.total_mib + 3 * own)
    assert four.parts["weights"] == one.parts["weights"] and 13_500 < one.parts["weights"] < 14_000  # 7.25 B parameters × 2 bytes, in MiB
