"""Benchmark mode: a fixed grid, each point in its own process, N repeats, Unsloth vs HF baseline,
and a regression check against a stored baseline.

``harness bench BENCH.yaml [--backend unsloth,hf] [--baseline FILE] [--save-baseline FILE]``

The driver side (this module) imports neither torch nor unsloth; each run is
``python -m harness.bench.point``. Results carry a fingerprint of the machine and software.

Regression rule (per point, backend and metric, over the repeats): with baseline median ``b``,
current median ``c`` and noise ``n = k · 1.4826 · MAD`` (MAD pooled over both sets of repeats,
each about its own median; scaled by 1/Φ⁻¹(3/4) ≈ 1.4826 it estimates a standard deviation,
``scipy.stats.median_abs_deviation(..., scale="normal")``), a higher-is-better metric regresses when
``c < b · (1 − t)`` and ``b − c > n``; a lower-is-better one when ``c > b · (1 + t)`` and
``c − b > n``. ``t`` is the metric's threshold. A point that ran in the baseline and runs out of
memory now is a regression too.
"""

from __future__ import annotations

import importlib.metadata
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape, quoteattr

import pynvml
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from scipy import stats

import harness
from harness import env as harness_env
from harness.sweep.config import ModelConfig, _one_line
from harness.errors import HarnessError, SweepFileError
from harness.files import write_json_atomic

HIGHER_IS_BETTER = {"tokens_per_s": True, "mfu": True, "mfu_6n": True, "mfu_measured": True, "step_s": False,
                    "peak_reserved_mib": False, "peak_alloc_mib": False, "peak_rss_mib": False}


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class BenchGrid(_Strict):
    batch_size: list[int] = Field(default=[4], min_length=1)
    seq_len: list[int] = Field(default=[2048], min_length=1)
    lora_r: list[int] = Field(default=[16], min_length=1)
    gradient_checkpointing: list[Literal["unsloth", "true", "false"] | bool] = Field(default=[True], min_length=1)


class Regression(_Strict):
    k: float = Field(default=3.0, gt=0)
    thresholds: dict[str, float] = {"tokens_per_s": 0.05, "peak_reserved_mib": 0.05}


class BenchConfig(_Strict):
    name: str = Field(min_length=1)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    model: ModelConfig
    grid: BenchGrid = BenchGrid()
    backends: list[Literal["unsloth", "hf"]] = Field(default=["unsloth", "hf"], min_length=1)
    lora_alpha: int = 16
    steps: int = Field(default=10, gt=0)
    warmup_steps: int = Field(default=3, ge=0)
    repeats: int = Field(default=3, gt=0)
    regression: Regression = Regression()


def load_bench(path: str | Path) -> BenchConfig:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SweepFileError(f"{path}: bench file not found") from None
    except yaml.YAMLError as err:
        raise SweepFileError(f"{path}: not valid YAML or uses a tag that is not allowed ({err})") from None
    try:
        return BenchConfig.model_validate(data)
    except ValidationError as err:
        raise SweepFileError(f"{path}: {_one_line(err)}") from None


def points(cfg: BenchConfig) -> list[dict[str, Any]]:
    g = cfg.grid
    return [dict(batch_size=b, seq_len=l, lora_r=r, gradient_checkpointing=str(c).lower())
            for b, l, r, c in itertools.product(g.batch_size, g.seq_len, g.lora_r, g.gradient_checkpointing)]


def point_key(point: dict[str, Any], backend: str) -> str:
    return (f"{backend} b{point['batch_size']} L{point['seq_len']} r{point['lora_r']} "
            f"gc={point['gradient_checkpointing']}")


def fingerprint() -> dict[str, Any]:
    """GPU name, count and memory; driver; CUDA; library versions; harness version and commit. No torch import."""
    fp: dict[str, Any] = gpu_fingerprint()
    for pkg in ("torch", "transformers", "peft", "trl", "unsloth", "unsloth_zoo"):
        fp[pkg] = _version(pkg)
    try:
        # torch's own CUDA build, asked in a child: the driver side must not import torch.
        fp["cuda"] = subprocess.run([sys.executable, "-c", "import torch; print(torch.version.cuda)"],
                                    capture_output=True, text=True, timeout=120).stdout.strip() or None
    except subprocess.SubprocessError:
        fp["cuda"] = None
    fp["harness_version"] = _version("harness")
    fp["harness_commit"] = source_commit(Path(harness.__file__).resolve().parent)
    fp["cpu_count"] = os.cpu_count()
    return fp


NO_GPU = {"gpu_name": None, "gpu_count": 0, "gpu_memory": None, "driver": None}


def gpu_fingerprint() -> dict[str, Any]:
    """GPU name, count, total memory (of the first GPU, as ``"81559 MiB"``) and driver version, from
    NVML; ``NO_GPU`` where there is no NVIDIA driver or GPU."""
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:  # no driver library, driver not loaded, no permission: nothing to describe
        return dict(NO_GPU)
    try:
        count = pynvml.nvmlDeviceGetCount()
        fp: dict[str, Any] = {"gpu_name": None, "gpu_count": count, "gpu_memory": None,
                              "driver": _text(pynvml.nvmlSystemGetDriverVersion())}
        if count:
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            fp["gpu_name"] = _text(pynvml.nvmlDeviceGetName(handle))
            fp["gpu_memory"] = f"{pynvml.nvmlDeviceGetMemoryInfo(handle).total // 2**20} MiB"
        return fp
    except pynvml.NVMLError:  # e.g. a GPU fallen off the bus: report none rather than fail the bench
        return dict(NO_GPU)
    finally:
        pynvml.nvmlShutdown()


def _text(value: str | bytes) -> str:
    """NVML strings: str from current nvidia-ml-py, bytes from older releases."""
    return value.decode() if isinstance(value, bytes) else value


def _version(dist: str) -> str | None:
    """An installed distribution's version, or None when it is not installed."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def source_commit(package_dir: Path) -> str | None:
    """The short git commit of the harness source in ``package_dir``, or None when that folder is not
    the ``harness/`` folder of a git checkout.

    git looks upward for a repository, so a non-editable install in a venv that happens to sit inside
    some other repository would otherwise report that repository's commit. Hence the check that the
    repository's top level holds this very package.
    """
    top = _git(package_dir, "rev-parse", "--show-toplevel")
    if top is None:
        return None
    source_init = Path(top) / "harness" / "__init__.py"
    try:
        if not source_init.samefile(package_dir / "__init__.py"):
            return None
    except OSError:  # either file missing: not this package's source
        return None
    return _git(package_dir, "rev-parse", "--short", "HEAD")


def _git(cwd: Path, *args: str) -> str | None:
    """A git command's stripped output, or None if git is missing, fails or prints nothing."""
    try:
        proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    if proc.returncode != 0:
        return None
    return proc.stdout.strip() or None


def run_point(spec: dict[str, Any], workdir: Path, tag: str) -> dict[str, Any]:
    spec_file, out_file, log = workdir / f"{tag}.spec.json", workdir / f"{tag}.json", workdir / f"{tag}.log"
    spec_file.write_text(json.dumps(spec))
    env = {**os.environ, harness_env.SPAWNED_AT: repr(time.time()), "PYTHONUNBUFFERED": "1"}
    with log.open("w") as f:
        code = subprocess.call([sys.executable, "-m", "harness.bench.point", str(spec_file), str(out_file)],
                               stdout=f, stderr=subprocess.STDOUT, env=env)
    if out_file.exists():
        return json.loads(out_file.read_text())
    tail = log.read_text(errors="replace").splitlines()[-5:]
    # The kernel's OOM killer sends SIGKILL: on CPU that is how running out of memory ends.
    return {"status": "oom" if code == -9 else "crash", "exit_code": code, "log_tail": tail}


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in runs if r["status"] == "ok"]
    out: dict[str, Any] = {"status": "ok" if ok else runs[0]["status"], "repeats": len(runs), "ok_repeats": len(ok)}
    for m in ("tokens_per_s", "step_s", "mfu", "mfu_6n", "mfu_measured", "peak_measured_flops", "flops_per_token",
              "peak_alloc_mib", "peak_reserved_mib", "peak_rss_mib", "load_s", "import_s", "spawn_s"):
        values = [r[m] for r in ok if r.get(m) is not None]
        if values:
            med = statistics.median(values)
            out[m] = {"median": med, "min": min(values), "max": max(values),  # "mad": unscaled, as stored before
                      "mad": float(stats.median_abs_deviation(values)), "values": values}
    if not ok and runs and runs[0].get("mem_at_failure_mib"):
        out["mem_at_failure_mib"] = runs[0]["mem_at_failure_mib"]
    return out


def run_bench(cfg: BenchConfig, out_dir: Path, backends: list[str] | None = None, progress=None) -> dict[str, Any]:
    """Every grid point × backend × repeat, each in a fresh process. Returns the results document."""
    out_dir.mkdir(parents=True, exist_ok=True)
    runs_dir = out_dir / "runs"
    runs_dir.mkdir(exist_ok=True)
    backends = backends or list(cfg.backends)
    results: dict[str, Any] = {}
    jobs = [(p, b) for p in points(cfg) for b in backends]
    for i, (point, backend) in enumerate(jobs):
        key = point_key(point, backend)
        runs = []
        for rep in range(cfg.repeats):
            if progress:
                progress(f"[{i + 1}/{len(jobs)}] {key} repeat {rep + 1}/{cfg.repeats}")
            spec = dict(point, backend=backend, model=cfg.model.name, dtype=cfg.model.dtype, device=cfg.device,
                        seed=cfg.seed, lora_alpha=cfg.lora_alpha, steps=cfg.steps, warmup_steps=cfg.warmup_steps,
                        target_modules=cfg.model.target_modules)
            runs.append(run_point(spec, runs_dir, f"{i:02d}-{backend}-{rep}"))
            if runs[-1]["status"] == "oom":
                break  # it will not fit next time either
        results[key] = {"point": point, "backend": backend, **summarize(runs), "runs": runs}
    doc = {"name": cfg.name, "model": cfg.model.name, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
           "fingerprint": fingerprint(), "config": cfg.model_dump(mode="json"), "results": results}
    write_json_atomic(out_dir / "results.json", doc)
    return doc


# -- comparison and reports ------------------------------------------------------------------------

FINGERPRINT_KEYS = ("gpu_name", "gpu_count", "driver", "cuda", "torch", "transformers", "peft", "trl", "unsloth")


def fingerprint_diff(a: dict, b: dict) -> list[str]:
    return [f"{k}: baseline {a.get(k)} vs now {b.get(k)}" for k in FINGERPRINT_KEYS if a.get(k) != b.get(k)]


def _read_mfu(result: dict) -> dict:
    """A point's summary with its MFUs under today's names. Results from before the FLOPs were
    counted as a LoRA step runs them (no ``flops_per_token``) stored PaLM's 6·N figure as ``mfu``:
    that is today's ``mfu_6n``, and they have no honest ``mfu``."""
    if "mfu" in result and "flops_per_token" not in result and "mfu_6n" not in result:
        result = {k: v for k, v in result.items() if k != "mfu"} | {"mfu_6n": result["mfu"]}
    return result


def _zero(x: Any, axis: int) -> float:
    """``median_abs_deviation``'s centre for deviations already taken from their own medians."""
    return 0.0


def compare(current: dict, baseline: dict, reg: Regression) -> list[dict[str, Any]]:
    """One row per (point, metric) in the thresholds: verdict ok | regressed | improved | missing."""
    rows = []
    for key, base in baseline["results"].items():
        base, cur = _read_mfu(base), current["results"].get(key)
        cur = None if cur is None else _read_mfu(cur)
        for metric, t in reg.thresholds.items():
            row = {"key": key, "metric": metric, "threshold": t}
            if cur is None:
                rows.append({**row, "verdict": "missing", "detail": "not run now"})
                continue
            if base["status"] != "ok":
                rows.append({**row, "verdict": "ok", "detail": f"baseline {base['status']}, now {cur['status']}"})
                continue
            if cur["status"] != "ok":
                rows.append({**row, "verdict": "regressed", "detail": f"ran in the baseline, {cur['status']} now"})
                continue
            if metric not in base or metric not in cur:
                continue
            b, c = base[metric]["median"], cur[metric]["median"]
            # Each set's deviations from its own median, pooled; their MAD is taken about zero.
            pooled = [v - b for v in base[metric]["values"]] + [v - c for v in cur[metric]["values"]]
            noise = reg.k * float(stats.median_abs_deviation(pooled, center=_zero, scale="normal"))
            higher = HIGHER_IS_BETTER.get(metric, True)
            worse = (b - c) if higher else (c - b)
            verdict = ("regressed" if worse > b * t and worse > noise
                       else "improved" if -worse > b * t and -worse > noise else "ok")
            rows.append({**row, "verdict": verdict, "baseline": b, "current": c, "change": (c - b) / b if b else None,
                         "noise": noise})
    return rows


def _num(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and abs(v) < 10:
        return f"{v:.3g}"
    return f"{v:,.0f}"


def markdown(doc: dict, comparison: list[dict] | None = None, warnings: list[str] | None = None) -> str:
    fp = doc["fingerprint"]
    lines = [f"# Benchmark `{doc['name']}`: {doc['model']}", "",
             (f"{fp['gpu_count']} × {fp['gpu_name']} {fp.get('gpu_memory')}, " if fp.get("gpu_name")
              else f"CPU ({fp.get('cpu_count')} cores), ") +
             f"driver {fp.get('driver')}, CUDA {fp.get('cuda')}; torch {fp.get('torch')}, transformers "
             f"{fp.get('transformers')}, peft {fp.get('peft')}, trl {fp.get('trl')}, unsloth {fp.get('unsloth')}; "
             f"harness {fp.get('harness_version')} at commit {fp.get('harness_commit')}", "",
             "| point | status | tokens/s median (min–max) | step s | MFU | MFU 6N | MFU (measured peak) | "
             "peak alloc MiB | peak reserved MiB | peak RSS MiB | import s | load s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    med = lambda r, m: r.get(m, {}).get("median")  # noqa: E731
    for key, r in doc["results"].items():
        r = _read_mfu(r)
        tps = r.get("tokens_per_s")
        spread = f"{_num(tps['median'])} ({_num(tps['min'])}–{_num(tps['max'])})" if tps else "-"
        lines.append(f"| {key} | {r['status']} | {spread} | {_num(med(r, 'step_s'))} | {_num(med(r, 'mfu'))} | "
                     f"{_num(med(r, 'mfu_6n'))} | {_num(med(r, 'mfu_measured'))} | "
                     f"{_num(med(r, 'peak_alloc_mib'))} | {_num(med(r, 'peak_reserved_mib'))} | "
                     f"{_num(med(r, 'peak_rss_mib'))} | {_num(med(r, 'import_s'))} | {_num(med(r, 'load_s'))} |")
    pairs = _speedups(doc)
    if pairs:
        lines += ["", "## Unsloth against the HF + PEFT baseline (same point, same run)", "",
                  "| point | speedup (tokens/s) | memory saved (peak reserved on GPU, RSS on CPU) |", "|---|---|---|"]
        lines += [f"| {p} | {s} | {m} |" for p, s, m in pairs]
    if warnings:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warnings]
    if comparison is not None:
        lines += ["", "## Against the baseline", "", "| point | metric | baseline | now | change | noise | verdict |",
                  "|---|---|---|---|---|---|---|"]
        for c in comparison:
            change = f"{c['change']:+.1%}" if c.get("change") is not None else c.get("detail", "")
            lines.append(f"| {c['key']} | {c['metric']} | {_num(c.get('baseline'))} | {_num(c.get('current'))} | "
                         f"{change} | {_num(c.get('noise'))} | **{c['verdict']}** |")
    lines += ["", "tokens/s: batch × sequence length (no padding) over the median step time after warm-up.", "",
              MFU_NOTE + _measured_peaks(doc), ""]
    return "\n".join(lines)


# The formula harness.worker.metrics.flops_per_token evaluates (its docstring derives it).
MFU_NOTE = (
    "MFU = FLOPs per token · tokens/s / peak bf16 FLOP/s, FLOPs counted as a LoRA step runs them: "
    "**4·N + 12·L·A·Q + 6·r·L·Σ(d_in + d_out)**, and with gradient checkpointing (which recomputes the "
    "decoder layers' forward) **+ 2·(N − H·V) + 4·L·A·Q + 2·r·L·Σ(d_in + d_out)**. "
    "4·N: forward and the activations' gradients through the frozen weights (no weight gradients); "
    "12·L·A·Q: attention, forward and backward; 6·r·L·Σ(d_in + d_out): the adapters, forward and the "
    "gradients of their activations and weights. N = parameters outside the input embedding (LM head "
    "included, adapters not), L layers, H hidden size, V vocabulary, A attention width (heads × head dim), "
    "Q sequence length, r LoRA rank, Σ over one layer's adapted linear layers (d_in × d_out each). "
    "MFU 6N: PaLM's conventional 6·N + 12·L·A·Q, which counts weight gradients LoRA never computes, "
    "as papers report it. Both against the card's data-sheet peak; MFU (measured peak): the real FLOPs "
    "against a bf16 8192³ matmul timed on the same card in the same process.")


def _measured_peaks(doc: dict) -> str:
    """' Measured peak: X TFLOP/s (data sheet Y).' from the points' medians, or '' where none was measured."""
    peaks = [r["peak_measured_flops"]["median"] for r in doc["results"].values() if r.get("peak_measured_flops")]
    if not peaks:
        return ""
    datasheet = next((run["peak_flops"] for r in doc["results"].values() for run in r.get("runs", [])
                      if run.get("peak_flops")), None)
    spread = f" ({min(peaks) / 1e12:,.0f}–{max(peaks) / 1e12:,.0f} over points)" if len(peaks) > 1 else ""
    return (f" Measured peak: {statistics.median(peaks) / 1e12:,.0f} TFLOP/s{spread}, data sheet "
            f"{f'{datasheet / 1e12:,.0f} TFLOP/s' if datasheet else 'unknown'}.")


def _speedups(doc: dict) -> list[tuple[str, str, str]]:
    out = []
    for key, r in doc["results"].items():
        if r["backend"] != "unsloth":
            continue
        hf = doc["results"].get(key.replace("unsloth", "hf", 1))
        if not hf:
            continue
        tps_u, tps_h = r.get("tokens_per_s", {}).get("median"), hf.get("tokens_per_s", {}).get("median")
        mem_key = "peak_reserved_mib" if "peak_reserved_mib" in r else "peak_rss_mib"
        mem_u, mem_h = r.get(mem_key, {}).get("median"), hf.get(mem_key, {}).get("median")
        speed = f"{tps_u / tps_h:.2f}×" if tps_u and tps_h else f"unsloth {r['status']}, hf {hf['status']}"
        saved = f"{(1 - mem_u / mem_h):.0%} ({_num(mem_h)} → {_num(mem_u)} MiB)" if mem_u and mem_h else "-"
        out.append((key.removeprefix("unsloth "), speed, saved))
    return out


def junit(doc: dict, comparison: list[dict]) -> str:
    failures = sum(c["verdict"] in ("regressed", "missing") for c in comparison)
    cases = []
    for c in comparison:
        name = quoteattr(f"{c['key']} {c['metric']}")
        body = ""
        if c["verdict"] in ("regressed", "missing"):
            msg = c.get("detail") or f"{c['metric']} {c['baseline']:.4g} -> {c['current']:.4g} ({c['change']:+.1%})"
            body = f"<failure message={quoteattr(msg)}>{escape(json.dumps(c))}</failure>"
        cases.append(f'  <testcase classname="harness.bench.{escape(doc["name"])}" name={name}>{body}</testcase>')
    return (f'<?xml version="1.0" encoding="UTF-8"?>\n<testsuite name="harness-bench" tests="{len(comparison)}" '
            f'failures="{failures}">\n' + "\n".join(cases) + "\n</testsuite>\n")


def check(doc: dict, baseline_path: Path, reg: Regression) -> tuple[list[dict], list[str]]:
    try:
        baseline = json.loads(Path(baseline_path).read_text())
    except FileNotFoundError:
        raise HarnessError(f"{baseline_path}: baseline file not found (write one with --save-baseline)") from None
    except json.JSONDecodeError as err:
        raise HarnessError(f"{baseline_path}: not a baseline written by --save-baseline ({err})") from None
    warnings = [f"fingerprint differs from the baseline, {d}" for d in fingerprint_diff(baseline["fingerprint"], doc["fingerprint"])]
    return compare(doc, baseline, reg), warnings
