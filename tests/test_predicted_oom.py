"""A config predicted over the memory budget is recorded infeasible without running
(outcome predicted_oom, the prediction stored); the others run, with the prediction beside the
measured peak."""

import optuna
import pytest
import yaml

from conftest import ROOT, run_cli

pytestmark = pytest.mark.timeout(900)


@pytest.mark.slow
def test_predicted_oom_is_skipped_and_recorded(tmp_path, harness_cache):
    sweep = {
        "study": "predicted", "seed": 0, "model": {"name": "tiny-mistral", "gradient_checkpointing": False},
        "dataset": {"source": "shakespeare", "max_val_rows": 16}, "max_seq_length": 128,
        "budget": {"tokens": 1500, "eval_every": 1500},
        # The analytic model puts batch 2 near 190 MiB and batch 16 near 400 MiB (the logits grow with it).
        "search_space": {"batch_size": {"choices": [2, 16]}, "lora_r": 4, "learning_rate": 1e-3},
        "sampler": {"name": "grid"}, "pruner": {"name": "none"}, "n_trials": 2,
        "memory_budget_mib": 300, "predicted_oom": "on",
    }
    path = tmp_path / "predicted.yaml"
    path.write_text(yaml.safe_dump(sweep))
    proc = run_cli("run", str(path), "--results-dir", str(tmp_path / "results"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    study_dir = tmp_path / "results" / "predicted"
    study = optuna.load_study(study_name="predicted", storage=f"sqlite:///{study_dir / 'study.db'}")
    by_batch = {t.params["batch_size"]: t for t in study.trials}
    big, small = by_batch[16], by_batch[2]
    assert big.user_attrs["outcome"] == "predicted_oom"
    assert big.user_attrs["predicted_mem_mib"] > 300 and "predicted out of memory" in big.user_attrs["reason"]
    assert big.constraints == {"predicted_oom": 1.0}
    assert not (study_dir / "trials" / str(big.number) / "log.txt").exists(), "a skipped config never started"
    assert "peak_mem_mib" not in big.user_attrs
    # The small config ran: predicted and measured side by side (on CPU the measure is the RSS,
    # far above a GPU prediction, so it ends over the budget).
    assert (study_dir / "trials" / str(small.number) / "log.txt").exists()
    assert small.user_attrs["predicted_mem_mib"] < 300 and small.user_attrs["peak_mem_mib"] > 0
    assert small.user_attrs["outcome"] in ("complete", "over_budget")
    assert "skipped" in proc.stdout
