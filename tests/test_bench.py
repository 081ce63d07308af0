"""harness bench on CPU with the embedded default: both backends for real, OOM recorded as OOM,
and the regression check's exit code, markdown and JUnit output. Also the fingerprint (NVML, the
harness commit) and the measurements shared with trials (harness.worker.metrics)."""

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, run_cli

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def bench_run(tmp_path_factory, harness_cache):
    out = tmp_path_factory.mktemp("bench")
    proc = run_cli("bench", "bench/tiny-cpu.yaml", "--out", str(out / "run"), "--save-baseline", str(out / "base.json"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, json.loads((out / "run" / "results.json").read_text()), proc


def test_both_backends_measured_each_in_its_own_process(bench_run):
    _, doc, proc = bench_run
    assert set(doc["results"]) == {"unsloth b4 L128 r8 gc=false", "hf b4 L128 r8 gc=false"}
    for key, r in doc["results"].items():
        assert r["status"] == "ok" and r["ok_repeats"] == r["repeats"] == 2, key
        assert r["tokens_per_s"]["median"] > 0 and r["tokens_per_s"]["min"] <= r["tokens_per_s"]["max"]
        assert r["peak_rss_mib"]["median"] > 200 and r["step_s"]["median"] > 0
        for run in r["runs"]:
            # The baseline never saw unsloth: Unsloth patches transformers for the whole process.
            assert run["unsloth_imported"] is (r["backend"] == "unsloth")
            assert len(run["step_s_all"]) == 4
    fp = doc["fingerprint"]
    assert fp["torch"] and fp["transformers"] and fp["peft"] and fp["unsloth"] and "harness_commit" in fp
    assert fp["harness_version"] and "gpu_memory" in fp and "driver" in fp
    report = (bench_run[0] / "run" / "report.md").read_text()
    assert "## Unsloth against the HF + PEFT baseline" in report and "| b4 L128 r8 gc=false |" in report


def test_same_results_against_themselves_pass(bench_run):
    out, doc, _ = bench_run
    from harness.bench.runner import Regression, compare

    rows = compare(doc, json.loads((out / "base.json").read_text()), Regression())
    assert rows and all(r["verdict"] == "ok" for r in rows)


def test_a_slower_run_than_the_baseline_fails_with_junit(bench_run, tmp_path):
    out, _, _ = bench_run
    baseline = json.loads((out / "base.json").read_text())
    for r in baseline["results"].values():  # a steady baseline twice as fast as this machine
        fast = r["tokens_per_s"]["max"] * 2
        r["tokens_per_s"].update(values=[fast, fast], median=fast)
    baseline["fingerprint"]["gpu_name"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / "fast.json").write_text(json.dumps(baseline))
    bench_file = tmp_path / "b.yaml"
    spec = yaml.safe_load((ROOT / "bench/tiny-cpu.yaml").read_text())
    spec.update(repeats=1, steps=2)
    bench_file.write_text(yaml.safe_dump(spec))
    proc = run_cli("bench", str(bench_file), "--out", str(tmp_path / "run"), "--baseline", str(tmp_path / "fast.json"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fingerprint differs from the baseline, gpu_name: baseline NVIDIA H100 80GB HBM3 vs now None" in proc.stdout
    suite = ET.parse(tmp_path / "run" / "junit.xml").getroot()
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert sorted(failed) == ["hf b4 L128 r8 gc=false tokens_per_s", "unsloth b4 L128 r8 gc=false tokens_per_s"]
    assert suite.get("failures") == "2"
    assert "**regressed**" in (tmp_path / "run" / "report.md").read_text()


def test_out_of_memory_is_recorded_not_a_crash(tmp_path, harness_cache):
    spec = yaml.safe_load((ROOT / "bench/tiny-cpu.yaml").read_text())
    # Attention scores alone would need over a terabyte: the allocator refuses at once.
    spec.update(name="oom", backends=["hf"], repeats=2, grid={"batch_size": [64], "seq_len": [32768], "lora_r": [8],
                                                             "gradient_checkpointing": [False]})
    (tmp_path / "oom.yaml").write_text(yaml.safe_dump(spec))
    proc = run_cli("bench", str(tmp_path / "oom.yaml"), "--out", str(tmp_path / "run"))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    r = json.loads((tmp_path / "run" / "results.json").read_text())["results"]["hf b64 L32768 r8 gc=false"]
    assert r["status"] == "oom" and r["repeats"] == 1, r
    assert "can't allocate memory" in r["runs"][0]["error"]
    assert r["mem_at_failure_mib"] == r["runs"][0]["mem_at_failure_mib"] > 0 and r["runs"][0]["peak_rss_mib"] > 0
    assert "| hf b64 L32768 r8 gc=false | oom |" in proc.stdout


# -- fingerprint: the harness commit, NVML ---------------------------------------------------------

def _git(repo, *args):
    import subprocess

    return subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@example.com", "-c", "commit.gpgsign=false",
                           *args], cwd=repo, check=True, capture_output=True, text=True).stdout.strip()


def _repo_with_package(repo, package_at):
    """A fresh git repository, with one commit, holding a copy of the harness package at ``package_at``."""
    import shutil

    import harness

    repo.mkdir()
    _git(repo, "init", "-q")
    shutil.copytree(Path(harness.__file__).parent, repo / package_at, ignore=shutil.ignore_patterns("__pycache__"))
    _git(repo, "add", "-A")
    _git(repo, "commit", "-q", "-m", "x")
    return repo / package_at


def test_source_commit_of_a_checkout_of_the_harness(tmp_path):
    from harness.bench.runner import source_commit

    package = _repo_with_package(tmp_path / "src", "harness")
    assert source_commit(package) == _git(package.parent, "rev-parse", "--short", "HEAD")


@pytest.mark.parametrize("other_harness_at_top", [False, True])
def test_no_source_commit_for_an_install_inside_another_repository(tmp_path, other_harness_at_top):
    """A non-editable install in a venv inside some other repository: that repository's commit says
    nothing about the harness, even if it has a harness/ of its own at the top."""
    from harness.bench.runner import source_commit

    repo = tmp_path / "other"
    package = _repo_with_package(repo, ".venv/lib/python3/site-packages/harness")
    if other_harness_at_top:
        (repo / "harness").mkdir()
        (repo / "harness" / "__init__.py").write_text("")
        _git(repo, "add", "-A")
        _git(repo, "commit", "-q", "-m", "y")
    assert source_commit(package) is None
    assert source_commit(tmp_path) is None  # not in any repository at all


def test_gpu_fingerprint_without_a_driver_is_quietly_empty(monkeypatch):
    import pynvml

    from harness.bench import runner

    def no_library():
        raise pynvml.NVMLError_LibraryNotFound()

    monkeypatch.setattr(runner.pynvml, "nvmlInit", no_library)
    assert runner.gpu_fingerprint() == {"gpu_name": None, "gpu_count": 0, "gpu_memory": None, "driver": None}


def test_gpu_fingerprint_from_nvml(monkeypatch):
    from types import SimpleNamespace

    from harness.bench import runner

    calls = []
    fake = dict(nvmlInit=lambda: calls.append("init"), nvmlShutdown=lambda: calls.append("shutdown"),
                nvmlDeviceGetCount=lambda: 2, nvmlSystemGetDriverVersion=lambda: b"580.159.04",  # older: bytes
                nvmlDeviceGetHandleByIndex=lambda i: i, nvmlDeviceGetName=lambda h: "NVIDIA H100 80GB HBM3",
                nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(total=85520809984))
    for name, fn in fake.items():
        monkeypatch.setattr(runner.pynvml, name, fn)
    assert runner.gpu_fingerprint() == {"gpu_name": "NVIDIA H100 80GB HBM3", "gpu_count": 2,
                                        "gpu_memory": "81559 MiB", "driver": "580.159.04"}
    assert calls == ["init", "shutdown"]


def test_fingerprint_has_harness_version_and_no_torch_import():
    import subprocess
    import sys

    code = ("import json, sys; from harness.bench.runner import fingerprint; fp = fingerprint(); "
            "print(json.dumps([fp['harness_version'], 'harness_commit' in fp, 'torch' in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    version, has_commit, torch_imported = json.loads(out.splitlines()[-1])
    assert version and has_commit and not torch_imported


# -- metrics shared with trials --------------------------------------------------------------------

def test_shared_metrics():
    import torch

    from harness.worker import metrics

    assert metrics.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried ..."))
    assert metrics.is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory")) and metrics.is_out_of_memory(MemoryError())
    assert not metrics.is_out_of_memory(RuntimeError("shape mismatch"))
    assert metrics.failure_message(RuntimeError("first\nsecond"), limit=3) == "fir"
    peaks = metrics.peak_memory("cpu")
    assert set(metrics.memory_peaks("cpu")) == {"peak_rss_mib"} and peaks["peak_mem_mib"] == peaks["peak_rss_mib"] > 0
    assert metrics.memory_in_use("cpu") > 0
    assert metrics.peak_flops("NVIDIA H100 PCIe") == 756e12 and metrics.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
    assert metrics.peak_flops(None) is None and metrics.peak_flops("Tesla T4") is None
