"""Full fine-tuning as a method, on CPU with real trials: one study compares LoRA and full
fine-tuning at the same data budget, a full trial's best/ holds a whole model that `harness eval`
reloads to the same validation loss, and a method the harness does not know is one clear line."""

import json

import optuna
import polars as pl
import pytest
import yaml

from conftest import run_cli

pytestmark = [pytest.mark.timeout(900), pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")]

BASE = {
    "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
    "dataset": {"source": "shakespeare", "max_val_rows": 16}, "max_seq_length": 64,
    "budget": {"tokens": 1000, "eval_every": 500},
    "search_space": {"batch_size": 4, "learning_rate": 1e-3, "lora_r": {"choices": [4]}},
    "sampler": {"name": "grid"}, "pruner": {"name": "none"}, "n_trials": 1, "wandb": {"mode": "disabled"},
}


def write_sweep(tmp_path, name, **changes):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**BASE, **changes, "study": name}))
    return path


def run_study(tmp_path, name, n_trials, **changes):
    path = write_sweep(tmp_path, name, **changes)
    proc = run_cli("run", str(path), "--results-dir", str(tmp_path / "r"), "--n-trials", str(n_trials))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return optuna.load_study(study_name=name, storage=f"sqlite:///{tmp_path / 'r' / name / 'study.db'}")


@pytest.fixture(scope="module")
def studies(tmp_path_factory, harness_cache):
    tmp = tmp_path_factory.mktemp("methods")
    both = run_study(tmp, "both", 2, search_space={**BASE["search_space"], "method": {"choices": ["lora", "full"]}})
    full = run_study(tmp, "full", 1, search_space={**BASE["search_space"], "method": "full"})
    return tmp / "r", both, full


@pytest.mark.slow
def test_one_study_compares_lora_and_full_fine_tuning_at_equal_data(studies):
    results, both, _ = studies
    trials = {t.params["method"]: t for t in both.trials}
    assert set(trials) == {"lora", "full"}
    lora, full = trials["lora"], trials["full"]
    for t in (lora, full):
        assert t.state == optuna.trial.TrialState.COMPLETE, t.user_attrs
        assert 1000 <= t.user_attrs["tokens_trained"] < 1000 + 4 * 64  # the same data budget
        assert sorted(t.intermediate_values) == [500, 1000]
    assert lora.user_attrs["method"] == "lora" and full.user_attrs["method"] == "full"
    # Every weight against rank-4 adapters: far more trainable parameters, and all of them.
    assert full.user_attrs["trainable_params"] == full.user_attrs["total_params"]
    assert full.user_attrs["trainable_params"] > 10 * lora.user_attrs["trainable_params"] > 0
    assert lora.user_attrs["trainable_params"] < lora.user_attrs["total_params"]

    df = pl.read_parquet(results / "both" / "trials.parquet")
    assert df.schema["trainable_params"] == pl.Int64 and df.schema["total_params"] == pl.Int64
    assert df.schema["method"] == pl.Utf8 and df.schema["param_method"] == pl.Utf8
    rows = {r["param_method"]: r for r in df.iter_rows(named=True)}
    assert rows["full"]["trainable_params"] == full.user_attrs["trainable_params"]
    # The LoRA rank does not apply to a full fine-tune: empty there, as sampled for LoRA.
    assert rows["full"]["param_lora_r"] is None and rows["lora"]["param_lora_r"] == 4
    summary = (results / "both" / "summary.md").read_text()
    assert "trainable_params" in summary and "`method=" in summary


@pytest.mark.slow
def test_a_full_fine_tune_is_saved_as_a_full_model_and_reloads_to_its_validation_loss(studies):
    results, _, full = studies
    study_dir = results / "full"
    (trial,) = full.trials
    assert trial.state == optuna.trial.TrialState.COMPLETE and trial.user_attrs["method"] == "full"
    best = study_dir / "best"
    assert (best / "config.json").exists() and list(best.glob("model*.safetensors"))
    assert (best / "tokenizer.json").exists() and not (best / "adapter_config.json").exists()
    assert json.loads((best / "trial.json").read_text())["method"] == "full"
    assert not list((study_dir / "trials").glob("*/weights")), "promoted, not copied"
    assert "Full model (every weight trained" in (study_dir / "summary.md").read_text()
    proc = run_cli("eval", str(study_dir))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    reloaded = float(proc.stdout.split("val_loss")[-1])
    assert reloaded == pytest.approx(trial.value, abs=1e-6)


def test_an_unknown_method_is_one_line_naming_the_key(tmp_path):
    path = write_sweep(tmp_path, "bad", search_space={**BASE["search_space"], "method": "qlora"})
    proc = run_cli("run", str(path), "--results-dir", str(tmp_path / "r"), timeout=120)
    assert proc.returncode == 2
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stdout + proc.stderr
    assert "search_space.method: expected one of lora, full, got 'qlora'" in lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
