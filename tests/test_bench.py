"""harness bench on CPU with the embedded default: both backends for real, OOM recorded as OOM,
and the regression check's exit code, markdown and JUnit output."""

import json
import xml.etree.ElementTree as ET

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
    assert "| hf b64 L32768 r8 gc=false | oom |" in proc.stdout
