"""The package's layout keeps its promises: the driver's side never imports the training stack,
and a worker never reaches past records and configs into the driver's side."""

import ast
import subprocess
import sys

from conftest import ROOT

TORCH_FREE = ["harness.cli", "harness.params", "harness.records", "harness.errors", "harness.files",
              "harness.sweep.config", "harness.sweep.study", "harness.sweep.storage", "harness.sweep.driver",
              "harness.sweep.display", "harness.sweep.report", "harness.sweep.plots", "harness.sweep.best",
              "harness.sweep.wandb_check", "harness.launch", "harness.bench.runner", "harness.sweep.predict",
              "harness.sweep.pruning", "harness.sweep.efficiency", "harness.sweep.outcome", "harness.sweep.trackers",
              "harness.sweep.replay", "harness.sweep.warm_start", "harness.sweep.gpu_budget",
              "harness.protocol", "harness.faults", "harness.launch.resident", "harness.launch.workers",
              "harness.launch.launcher", "harness.data.spec", "harness.data.sources", "harness.data.formats",
              "harness.data.presets", "harness.data.prepare", "harness.cluster", "harness.cluster.secrets",
              "harness.cluster.slurm", "harness.cluster.k8s", "harness.sweep.signals"]


def test_the_sweep_launch_and_bench_driver_modules_import_without_torch():
    # Imported in a fresh interpreter: none of torch, unsloth, transformers or peft may come along.
    code = ("import sys\n" + "".join(f"import {m}\n" for m in TORCH_FREE)
            + "from harness.sweep.report import build_report\n"
            "print('ok', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'unsloth', 'transformers', 'peft')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ok []"


def harness_imports(path, root=ROOT) -> set[str]:
    """Every harness module a file imports, at the top or inside a function, by statement or by
    ``importlib.import_module`` / ``__import__`` of a literal name."""
    package = ".".join(path.relative_to(root).with_suffix("").parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package up
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            found |= {f"{base}.{alias.name}" for alias in node.names} | ({base} - {"harness"})
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and (getattr(node.func, "attr", None) == "import_module" or getattr(node.func, "id", None) == "__import__")):
            found.add(node.args[0].value)
    return {name for name in found if name.split(".")[0] == "harness"}


def test_a_worker_imports_no_driver_side_module_and_never_sees_the_storage():
    """Imports flow one way: harness/worker takes records, configs, data and the protocol, nothing of
    the launcher or the study; no worker module imports Optuna or names the storage URL."""
    for path in sorted((ROOT / "harness" / "worker").glob("*.py")):
        for name in harness_imports(path):
            if name.startswith(("harness.sweep", "harness.launch")):
                assert name.startswith("harness.sweep.config"), f"{path.name} imports {name}"
        text = path.read_text()
        assert "import optuna" not in text and "from optuna" not in text, path.name
        for word in ("STORAGE_URL", "storage_url", "make_storage"):
            assert word not in text, f"{path.name} mentions {word}"


def test_data_knows_nothing_of_sweeps_trials_or_workers():
    """Imports flow one way: the sweep and worker sides may import harness.data, never the reverse."""
    files = sorted((ROOT / "harness" / "data").glob("*.py"))
    assert {p.name for p in files} >= {"prepare.py", "spec.py", "sources.py", "formats.py", "presets.py"}
    allowed = ("harness.data", "harness.errors", "harness.files", "harness.params", "harness.env")
    for path in files:
        for name in harness_imports(path):
            assert any(name == a or name.startswith(a + ".") for a in allowed), f"{path.relative_to(ROOT)} imports {name}"


def test_the_import_check_sees_every_kind_of_import(tmp_path):
    pkg = tmp_path / "harness" / "data"
    pkg.mkdir(parents=True)
    (pkg / "x.py").write_text(
        "import harness.sweep.config\nfrom harness.worker import pretrain\nfrom ..launch import base\n"
        "def f():\n    from harness.sweep.config import SweepConfig\n    import importlib\n"
        "    importlib.import_module('harness.worker.loop')\n")
    assert harness_imports(pkg / "x.py", tmp_path) >= {
        "harness.sweep.config", "harness.worker.pretrain", "harness.launch.base",
        "harness.sweep.config.SweepConfig", "harness.worker.loop"}


def test_one_table_of_hyperparameters():
    """The sweep file's search space, the study's typing and the training parameters are one table."""
    import dataclasses

    from harness import params
    from harness.sweep.config import SearchSpace

    assert list(SearchSpace.model_fields) == [f.name for f in dataclasses.fields(params.TrainParams)]
    assert params.INTEGER == {"batch_size", "grad_accum", "lora_r", "lora_alpha", "epochs", "max_tokens_per_batch"}
    assert params.TYPES["method"] is str and params.ALLOWED == {
        "method": ("lora", "full"), "packing": ("none", "naive", "padding_free"), "batching": ("random", "length_grouped")}
    assert params.DEFAULTS["method"] == "lora" and params.DEFAULTS["packing"] == "none"
    assert params.applicable({"method": "full", "lora_r": 8, "batch_size": 4}) == {
        "method": "full", "lora_r": None, "batch_size": 4}
    assert params.applicable({"batch_size": 4, "max_tokens_per_batch": 2048}) == {
        "batch_size": None, "max_tokens_per_batch": 2048}
    assert params.typed({"batch_size": 4.0, "packing": "padding_free", "learning_rate": 1}) == {
        "batch_size": 4, "packing": "padding_free", "learning_rate": 1.0}
    # Older sweep files and the studies they stored: packing was true/false.
    assert params.typed({"packing": True})["packing"] == "naive" and params.typed({"packing": False})["packing"] == "none"


def test_a_record_round_trips_and_names_its_state():
    import pytest

    from harness.records import TrialResult

    r = TrialResult(number=3, outcome="oom", reason="out of memory", metrics={"peak_mem_mib": 10.5, "steps": 2})
    again = TrialResult.from_json(r.to_json())
    assert again == r and again.state == "infeasible" and not again.retried
    assert r.user_attrs() == {"outcome": "oom", "reason": "out of memory", "reached_training": False,
                              "peak_mem_mib": 10.5, "steps": 2}
    assert TrialResult(number=1, outcome="infrastructure").retried
    with pytest.raises(ValueError, match="unknown outcome"):
        TrialResult(number=1, outcome="exploded")
