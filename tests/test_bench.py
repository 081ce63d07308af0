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


@pytest.mark.slow
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


@pytest.mark.slow
def test_flops_reported_and_no_mfu_on_cpu(bench_run):
    """FLOPs per token counted off each backend's loaded model agree with the tiny-mistral preset's
    numbers; every MFU is None on CPU (no data-sheet peak, no measured one), and nothing crashes."""
    out, doc, _ = bench_run
    from harness.bench.runner import MFU_NOTE
    from harness.data.presets import PRESETS
    from harness.worker import metrics

    p = PRESETS["tiny-mistral"]
    h, i = p["hidden_size"], p["intermediate_size"]
    kv = p["num_key_value_heads"] * h // p["num_attention_heads"]  # K and V: the KV heads × head dim
    shape = metrics.ModelShape(layers=p["num_hidden_layers"], hidden=h, vocab=p["vocab_size"],
                               linears=dict(q_proj=(h, h), k_proj=(h, kv), v_proj=(h, kv), o_proj=(h, h),
                                            gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h)),
                               other_params=p["num_hidden_layers"] * 2 * h + h)  # two RMSNorms a layer, one final
    expected = metrics.flops_per_token(shape, 128, method="lora", checkpointing=False, lora_rank=8,
                                       lora_targets=ALL_7)  # bench/tiny-cpu.yaml: r 8, the 7 default targets
    for key, r in doc["results"].items():
        assert r["flops_per_token"]["median"] == expected, key
        for run in r["runs"]:
            assert run["flops_per_token"] == expected < run["flops_per_token_6n"]
            assert run["flops_per_token_6n"] == metrics.flops_per_token(shape, 128, method="full")
            assert run["flops_formula"] == "4·N + 12·L·A·Q + 6·r·L·Σ(d_in + d_out)"
            assert run["model_flops_per_s"] > 0
            assert run["peak_flops"] is run["mfu"] is run["mfu_6n"] is None
            assert run["peak_measured_flops"] is run["mfu_measured"] is None
        assert "mfu" not in r and "mfu_measured" not in r  # no values: no summary
    report = (out / "run" / "report.md").read_text()
    assert "| MFU | MFU 6N | MFU (measured peak) |" in report and MFU_NOTE in report


@pytest.mark.slow
def test_same_results_against_themselves_pass(bench_run):
    out, doc, _ = bench_run
    from harness.bench.runner import Regression, compare

    rows = compare(doc, json.loads((out / "base.json").read_text()), Regression())
    assert rows and all(r["verdict"] == "ok" for r in rows)


@pytest.mark.slow
def test_a_slower_run_than_the_baseline_fails_with_junit(bench_run, tmp_path):
    out, _, _ = bench_run
    baseline = json.loads((out / "base.json").read_text())
    # The HF baseline alone (one process to run again, not two; the fixture ran both backends).
    baseline["results"] = {k: r for k, r in baseline["results"].items() if r["backend"] == "hf"}
    for r in baseline["results"].values():  # a steady baseline ten times as fast as this machine
        fast = r["tokens_per_s"]["max"] * 10  # (a busy 2-core machine's runs vary by 2x and more)
        r["tokens_per_s"].update(values=[fast, fast], median=fast)
    baseline["fingerprint"]["gpu_name"] = "NVIDIA H100 80GB HBM3"
    (tmp_path / "fast.json").write_text(json.dumps(baseline))
    bench_file = tmp_path / "b.yaml"
    spec = yaml.safe_load((ROOT / "bench/tiny-cpu.yaml").read_text())
    spec.update(repeats=1, steps=2, backends=["hf"])
    bench_file.write_text(yaml.safe_dump(spec))
    proc = run_cli("bench", str(bench_file), "--out", str(tmp_path / "run"), "--baseline", str(tmp_path / "fast.json"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fingerprint differs from the baseline, gpu_name: baseline NVIDIA H100 80GB HBM3 vs now None" in proc.stdout
    suite = ET.parse(tmp_path / "run" / "junit.xml").getroot()
    failed = [c.get("name") for c in suite.iter("testcase") if c.find("failure") is not None]
    assert failed == ["hf b4 L128 r8 gc=false tokens_per_s"]
    assert suite.get("failures") == "1"
    assert "**regressed**" in (tmp_path / "run" / "report.md").read_text()


@pytest.mark.slow
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


# -- FLOPs per token -------------------------------------------------------------------------------

TINY_LINEARS = dict(q_proj=(64, 64), k_proj=(64, 64), v_proj=(64, 64), o_proj=(64, 64),
                    gate_proj=(64, 128), up_proj=(64, 128), down_proj=(128, 64))
ALL_7 = list(TINY_LINEARS)


def _tiny_shape():
    from harness.worker import metrics

    # 2 layers, hidden 64, MLP 128, vocabulary 100; 320 norm weights (2 × 64 a layer, 64 final).
    return metrics.ModelShape(layers=2, hidden=64, vocab=100, linears=TINY_LINEARS, other_params=320)


def test_flops_per_token_by_hand():
    """Every figure worked out by hand for the tiny shape at Q = 32, rank 4 on all 7 linear layers."""
    from harness.worker import metrics

    shape, q = _tiny_shape(), 32
    # N: a layer's linears 4·64·64 + 3·64·128 = 40,960, × 2 layers = 81,920; LM head 64·100 = 6,400;
    # norms 320. N = 88,640.
    assert shape.n == 88_640
    # Adapters: r·Σ(d_in + d_out) = 4 · (4·128 + 3·192) = 4,352 a layer, 8,704 in all; 17,408 FLOPs forward.
    assert shape.adapter_params(4, ALL_7) == 8_704
    attention = 4 * 2 * 64 * q  # 4·L·A·Q = 16,384 forward
    adapters = 2 * 8_704
    n = 88_640

    lora = metrics.flops_per_token(shape, q, method="lora", checkpointing=False, lora_rank=4, lora_targets=ALL_7)
    # 4·N + 12·L·A·Q + 3 × adapters' forward = 354,560 + 49,152 + 52,224
    assert lora == 4 * n + 3 * attention + 3 * adapters == 455_936

    lora_gc = metrics.flops_per_token(shape, q, method="lora", checkpointing=True, lora_rank=4, lora_targets=ALL_7)
    # + one more forward of the decoder layers, not the LM head: 2·(88,640 − 6,400) + 16,384 + 17,408
    assert lora_gc == lora + 2 * (n - 6_400) + attention + adapters == 654_208

    full = metrics.flops_per_token(shape, q, method="full", checkpointing=False)
    assert full == 6 * n + 12 * 2 * 64 * q == 580_992  # PaLM's 6·N + 12·L·H·Q, untouched
    full_gc = metrics.flops_per_token(shape, q, method="full", checkpointing=True)
    assert full_gc == full + 2 * (n - 6_400) + attention == 761_856

    # Against full training with the same checkpointing. LoRA with checkpointing is not below
    # PaLM's 6·N (full): its extra forward costs about the 2·N of weight gradients it skips, and
    # rank 4 on 64-wide layers makes the adapters a tenth of the weights (7B shapes: next test).
    assert lora < lora_gc < full_gc and lora < full < lora_gc
    # Only q and v adapted; an unknown name adds nothing. Adapters' forward: 2 FLOPs × 2 layers ×
    # r 4 × (64 + 64) × 2 modules = 4,096, three times over.
    assert metrics.flops_per_token(shape, q, method="lora", lora_rank=4, lora_targets=["q_proj", "v_proj", "nope"]) \
        == 4 * n + 3 * attention + 3 * 4_096 == 416_000
    assert metrics.flops_formula("lora", False) == "4·N + 12·L·A·Q + 6·r·L·Σ(d_in + d_out)"
    assert metrics.flops_formula("full", False) == "6·N + 12·L·A·Q"
    with pytest.raises(ValueError, match="method"):
        metrics.flops_per_token(shape, q, method="qlora")


def test_lora_against_6n_at_7b():
    """Mistral-7B's shapes, rank 16 on all 7 layers, 2048 tokens. Without checkpointing LoRA runs
    about 0.7 of the conventional 6·N figure; with it, the extra forward (2·N less the LM head, plus
    attention) buys back the skipped weight gradients (2·N) and a little more."""
    from harness.worker import metrics

    h, kv, i = 4096, 1024, 14336
    shape = metrics.ModelShape(layers=32, hidden=h, vocab=32768, other_params=32 * 2 * h + h,
                               linears=dict(q_proj=(h, h), k_proj=(h, kv), v_proj=(h, kv), o_proj=(h, h),
                                            gate_proj=(h, i), up_proj=(h, i), down_proj=(i, h)))
    kw = dict(lora_rank=16, lora_targets=ALL_7)
    six_n = metrics.flops_per_token(shape, 2048, method="full")
    lora = metrics.flops_per_token(shape, 2048, checkpointing=False, **kw)
    lora_gc = metrics.flops_per_token(shape, 2048, checkpointing=True, **kw)
    full_gc = metrics.flops_per_token(shape, 2048, method="full", checkpointing=True)
    assert 7.11e9 < shape.n < 7.12e9  # Mistral-7B: 7.25 B parameters, 134 M of them the input embedding
    assert shape.adapter_params(16, ALL_7) == 41_943_040  # PEFT's count for this model: 0.58 % of it
    assert lora < six_n < lora_gc < full_gc
    assert 0.68 < lora / six_n < 0.71 and 1.0 < lora_gc / six_n < 1.05


def test_model_shape_of_a_peft_model():
    """The thin wrapper reads the same numbers off a real (tiny, random) model wrapped by PEFT."""
    from peft import LoraConfig, get_peft_model
    from transformers import MistralConfig, MistralForCausalLM

    from harness.worker import metrics

    cfg = MistralConfig(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, head_dim=16)
    model = MistralForCausalLM(cfg)
    before = sum(p.numel() for p in model.parameters()) - model.get_input_embeddings().weight.numel()
    model = get_peft_model(model, LoraConfig(r=4, target_modules=ALL_7, task_type="CAUSAL_LM"))
    shape = metrics.model_shape(model)
    assert shape.linears == dict(TINY_LINEARS, k_proj=(64, 32), v_proj=(64, 32))  # 2 KV heads of 16
    assert (shape.layers, shape.hidden, shape.vocab, shape.attn_width, shape.other_params) == (2, 64, 100, 64, 320)
    assert shape.n == before  # N: everything but the input embedding and the adapters
    assert shape.adapter_params(4, ALL_7) == sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_report_reads_old_results_and_shows_the_measured_peak():
    """Stored results from before the honest count hold PaLM's 6·N figure as ``mfu``: the report
    and the comparison read it as ``mfu_6n``. A GPU run's footnote gives the measured peak."""
    import copy

    from harness.bench.runner import Regression, compare, markdown

    old = json.loads((ROOT / "bench/baselines/mistral7b-h100.json").read_text())
    assert "| unsloth b4 L2048 r16 gc=unsloth | ok | 10,937 (10,937–10,937) | 0.749 | - | 0.51 | - |" in markdown(old)
    new = copy.deepcopy(old)
    r = new["results"]["unsloth b4 L2048 r16 gc=unsloth"]
    stat = lambda v: {"median": v, "min": v, "max": v, "mad": 0.0, "values": [v]}  # noqa: E731
    r.update(mfu=stat(0.5231), mfu_6n=stat(0.5104), mfu_measured=stat(0.6523), flops_per_token=stat(4.7e10),
             peak_measured_flops=stat(7.93e14))
    r["runs"][0]["peak_flops"] = 989e12
    report = markdown(new)
    assert "| unsloth b4 L2048 r16 gc=unsloth | ok | 10,937 (10,937–10,937) | 0.749 | 0.523 | 0.51 | 0.652 |" \
        in report
    assert "Measured peak: 793 TFLOP/s, data sheet 989 TFLOP/s." in report
    rows = compare(new, old, Regression(thresholds={"mfu_6n": 0.05, "mfu": 0.05}))
    # The old mfu compared as mfu_6n; an old baseline has no honest mfu to compare against.
    point = [(x["metric"], x["verdict"]) for x in rows if x["key"] == "unsloth b4 L2048 r16 gc=unsloth"]
    assert point == [("mfu_6n", "ok")]


def test_mfu_against_the_measured_peak(monkeypatch):
    """The worker's last figure, with the matmul faked (no GPU here): achieved FLOP/s over measured
    peak; None on CPU, for a point that did not train, and when the matmul itself runs out of memory."""
    import torch

    from harness.bench import point
    from harness.worker import metrics

    assert metrics.measured_peak_flops("cpu") is None
    assert metrics.mfu(1e9, 400_000.0, 8e14) == 0.5 and metrics.mfu(1e9, 400_000.0, None) is None
    monkeypatch.setattr(metrics, "measured_peak_flops", lambda device: 8e14)
    out = {"status": "ok", "flops_per_token": 1e9, "tokens_per_s": 400_000.0}
    point._against_measured_peak("cuda", out)
    assert out["peak_measured_flops"] == 8e14 and out["mfu_measured"] == 0.5
    for device, status in (("cpu", "ok"), ("cuda", "oom")):
        out = {"status": status, "flops_per_token": 1e9, "tokens_per_s": 400_000.0}
        point._against_measured_peak(device, out)
        assert out["peak_measured_flops"] is out["mfu_measured"] is None

    def oom(device):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(metrics, "measured_peak_flops", oom)
    out = {"status": "ok", "flops_per_token": 1e9, "tokens_per_s": 400_000.0}
    point._against_measured_peak("cuda", out)
    assert out["peak_measured_flops"] is out["mfu_measured"] is None
