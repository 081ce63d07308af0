"""How well ``harness.sweep.predict`` predicts a trial's peak GPU memory (issue #14).

``run`` (on a GPU): for each group of configs sharing what is loaded (model, sequence length,
gradient checkpointing) the base is loaded once (:class:`harness.worker.warm.WarmBase`), and each
config (batch size, accumulation, LoRA rank) gets a fresh adapter and trains 2 optimizer steps of
full-length rows plus one validation pass with the harness's own loop (``loop.train``), measuring
CUDA max reserved memory as a trial does; out of memory is recorded as such. The group's first
config is run again at its end, so a warm measurement can be compared with the first in the
process. Results go, one JSON line per config, to ``OUT/measured.jsonl``; a group already there is
skipped, so a cut-off call resumes.

``report`` (anywhere, no torch): the analytic prediction of every config, calibrations fitted on a
"study's first trials" (the first completed configs of a seeded random order, repeated over many
orders; see :func:`report` for the two ways a study is drawn), the errors, and the out-of-memory
skip rates: on the card itself (the configs that really ran out) and under emulated memory
budgets (``memory_budget_mib``: a config really goes over when its measured peak does). Writes
``OUT/report.md`` and ``OUT/summary.json``.

    python bench/predictor_check.py run --out DIR [--models mistral-7b-v0.3,mistral-1b]
    python bench/predictor_check.py report DIR
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# (model, max_seq_length, gradient_checkpointing): [(batch_size, grad_accum, lora_r), ...]
PLAN: dict[tuple[str, int, str], list[tuple[int, int, int]]] = {
    ("mistral-7b-v0.3", 2048, "unsloth"): [(4, 1, 16), (1, 1, 16), (8, 2, 16), (16, 1, 16), (2, 1, 64), (8, 1, 64)],
    ("mistral-7b-v0.3", 2048, "false"): [(1, 1, 16), (2, 1, 16), (4, 1, 16), (8, 1, 16), (16, 1, 16), (2, 2, 64)],
    ("mistral-7b-v0.3", 1024, "true"): [(4, 1, 16), (16, 2, 16), (32, 1, 16), (8, 1, 64), (48, 1, 64)],
    ("mistral-7b-v0.3", 4096, "unsloth"): [(2, 1, 16), (1, 2, 16), (8, 1, 16), (4, 1, 64)],
    ("mistral-1b", 2048, "unsloth"): [(4, 1, 16), (1, 1, 16), (16, 2, 16), (32, 1, 16), (8, 1, 64)],
    ("mistral-1b", 2048, "false"): [(2, 1, 16), (8, 1, 16), (16, 1, 16), (32, 1, 16), (4, 2, 64)],
    ("mistral-1b", 4096, "true"): [(4, 1, 16), (16, 1, 16), (2, 2, 64), (32, 1, 64)],
    ("mistral-1b", 1024, "false"): [(8, 1, 16), (32, 1, 16), (64, 1, 16), (16, 1, 64)],
}
# A CPU dry run of the script itself (no GPU: peaks are then the process's RSS, not comparable).
CPU_PLAN = {("tiny-mistral", 64, "unsloth"): [(2, 1, 8), (4, 1, 16)]}


def group_name(model: str, seq: int, gc: str) -> str:
    return f"{model}/seq{seq}/gc-{gc}"


# -- run (GPU) ---------------------------------------------------------------------------------------

def run(out: Path, models: list[str]) -> None:
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    import unsloth  # noqa: F401  (first: it patches transformers and peft)
    import gc as pygc

    import numpy as np
    import torch

    from harness.worker.prepare import build_preset
    from harness.params import TrainParams
    from harness.worker import loop as T
    from harness.worker.warm import BaseKey, WarmBase

    out.mkdir(parents=True, exist_ok=True)
    path = out / "measured.jsonl"
    done = {json.loads(line)["group"] for line in path.read_text().splitlines()} if path.exists() else set()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    gpu = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    card_mib = torch.cuda.get_device_properties(0).total_memory / 2**20 if device == "cuda" else 0.0
    dtype = "bfloat16" if device == "cuda" else "float32"
    rng = np.random.default_rng(0)
    for (model, seq, gc), configs in (PLAN if device == "cuda" else CPU_PLAN).items():
        name = group_name(model, seq, gc)
        if (device == "cuda" and model not in models) or name in done:
            continue
        t0 = time.perf_counter()
        model_dir = str(build_preset(model, 0))
        base = WarmBase(BaseKey(model_dir, seq, dtype, False), device)
        print(f"[{name}] base loaded in {time.perf_counter() - t0:.1f} s", flush=True)
        lines = []
        for index, (bs, accum, rank) in enumerate([*configs, configs[0]]):
            rows = [(rng.integers(5, 32000, seq).astype(np.int32), None) for _ in range(bs * accum * 2)]
            val = [(rng.integers(5, 32000, seq).astype(np.int32), None) for _ in range(8)]
            params = TrainParams(method="lora", batch_size=bs, grad_accum=accum, learning_rate=1e-4, lora_r=rank,
                                 lora_alpha=rank, lora_dropout=0.0, epochs=1, weight_decay=0.0, warmup_ratio=0.0,
                                 packing="none", batching="random", max_tokens_per_batch=0)
            line = dict(group=name, model=model, max_seq_length=seq, gradient_checkpointing=gc, batch_size=bs,
                        grad_accum=accum, lora_r=rank, index=index, repeat=index == len(configs), gpu=gpu,
                        card_mib=round(card_mib, 1))
            t1 = time.perf_counter()
            try:
                peft_model = base.lend(lora_r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=TARGETS,
                                       checkpointing=gc, seed=0)
                T.train(peft_model, rows, val, params, pad_id=0, device=device, seed=0, max_seq_length=seq,
                        budget=T.DataBudget("steps", 2, 2), timing_warmup_steps=0,
                        on_step=lambda *a: None, on_eval=lambda *a: None)
                line.update(outcome="complete", **T.peak_memory(device))
            except Exception as err:  # noqa: BLE001 - out of memory is a result; anything else is reported
                if not T.is_out_of_memory(err):
                    raise
                line.update(outcome="oom", error=T.failure_message(err), **T.peak_memory(device))
            peft_model = None
            pygc.collect()
            base.give_back()
            line.update(seconds=round(time.perf_counter() - t1, 1), leaked_mib=round(base.leaked_mib(), 1))
            print(json.dumps(line), flush=True)
            lines.append(line)
        with path.open("a") as f:  # the whole group at once: a cut-off group runs again whole
            f.writelines(json.dumps(line) + "\n" for line in lines)
        base = None
        pygc.collect()
        T.release_cached_memory(device)


# -- report (no torch) ---------------------------------------------------------------------------------

def _sweep(line: dict):
    from harness.sweep.config import parse_sweep

    return parse_sweep(dict(study="check", model=dict(name=line["model"], dtype="bfloat16",
                                                      gradient_checkpointing=line["gradient_checkpointing"],
                                                      target_modules=TARGETS),
                            max_seq_length=line["max_seq_length"],
                            search_space=dict(batch_size=line["batch_size"], lora_r=line["lora_r"])))


def _params(line: dict) -> dict:
    return {"batch_size": line["batch_size"], "grad_accum": line["grad_accum"], "lora_r": line["lora_r"],
            "lora_alpha": line["lora_r"], "method": "lora"}


def _err(pred: float, measured: float) -> float:
    return abs(pred - measured) / measured


LIMITS_MIB = (16_384, 24_576, 40_960)  # emulated memory_budget_mib values, beside the card itself


def _scenario(studies: list[list[dict]], k: int, orders: int, margin: float, card_mib: float, seed: int) -> dict:
    """Each study's configs in ``orders`` random orders: its first ``k`` that ran calibrate
    (``Calibration.fit``, as ``StudyMemory`` does), the others are judged. Errors of the calibrated
    peak, pooled; and per limit, how many configs over it were skipped and how many that fit were
    skipped wrongly."""
    from harness.sweep import predict as pm

    rng = random.Random(seed)
    errors, order_means, order_worsts, per_config = [], [], [], {}
    limits = [("card", card_mib, True)] + [(f"budget {b:,} MiB", b, False) for b in LIMITS_MIB]
    skips = {label: [0, 0, 0, 0] for label, _, _ in limits}  # over & skipped, over, fit & skipped, fit
    for study in studies:
        if sum(x["outcome"] == "complete" for x in study) <= k:
            continue
        for _ in range(orders):
            order = study[:]
            rng.shuffle(order)
            done = [x for x in order if x["outcome"] == "complete"][:k]
            calib = pm.Calibration.fit([(x["parts"], x["peak_mem_mib"]) for x in done])
            judged = [x for x in order if x not in done]
            errs = []
            for x in judged:
                pred = calib.apply(pm.Prediction(sum(x["parts"].values()), x["parts"]))
                if x["outcome"] == "complete":
                    e = _err(pred.peak_mib, x["peak_mem_mib"])
                    errs.append(e)
                    per_config.setdefault(id(x), []).append(e)
                for label, limit, with_context in limits:
                    over = x["outcome"] == "oom" or (not with_context and x["peak_mem_mib"] > limit)
                    skip = pm.over_limit(pred, limit, margin, include_context=with_context)
                    counts = skips[label]
                    counts[0 if over else 2] += skip
                    counts[1 if over else 3] += 1
            if errs:
                errors += errs
                order_means.append(statistics.fmean(errs))
                order_worsts.append(max(errs))
    return {"mean": statistics.fmean(errors), "mean_p90_over_orders": _quantile(order_means, 0.9),
            "worst_median_over_orders": statistics.median(order_worsts), "worst_p90_over_orders": _quantile(order_worsts, 0.9),
            "worst_any": max(order_worsts), "per_config": per_config,
            "skips": {label: {"over": c[1], "caught": c[0] / c[1] if c[1] else None,
                              "fit": c[3], "wrongly_skipped": c[2] / c[3] if c[3] else None} for label, c in skips.items()}}


def report(out: Path, orders: int = 200, margin: float = 0.05) -> dict:
    """Two ways to be "calibrated on a study's first trials": per study (a study fixes the
    model, sequence length and checkpointing, so each group of the plan is one study, calibrated on
    its first 3 trials), and mixed (all of a model's groups as one study, calibrated on its first
    5: a harder test, since the calibration must carry across sequence lengths and checkpointing)."""
    from harness.sweep import predict as pm

    lines = [json.loads(x) for x in (out / "measured.jsonl").read_text().splitlines()]
    first = [x for x in lines if not x["repeat"]]
    for x in lines:
        pred = pm.predict(_sweep(x), _params(x))
        x["parts"], x["analytic_peak"], x["analytic_total"] = pred.parts, pred.peak_mib, pred.total_mib
    card = lines[0]["card_mib"]
    summary: dict = {"gpu": lines[0]["gpu"], "card_mib": card, "configs": len(first), "orders": orders,
                     "margin": margin, "ridge": pm.RIDGE, "models": {}}
    md = [f"Card: {summary['gpu']} ({card:,.0f} MiB). {len(first)} configs "
          f"({sum(x['outcome'] == 'oom' for x in first)} ran out of memory on the card). Calibration: "
          f"`Calibration.fit` (non-negative least squares per group of terms, ridge {pm.RIDGE:g} toward 1), "
          f"{orders} random orders of each study's configs.", ""]

    repeats = []
    for x in lines:
        if x["repeat"] and x["outcome"] == "complete":
            y = next(y for y in lines if y["group"] == x["group"] and y["index"] == 0)
            if y["outcome"] == "complete":
                repeats.append((x["group"], y["peak_mem_mib"], x["peak_mem_mib"], x.get("leaked_mib")))
    summary["repeat_diffs"] = {g: round((b - a) / a, 4) for g, a, b, _ in repeats}
    md += ["Each group's first config run again at the group's end (same process, base kept, adapters lent and "
           "given back in between):", "",
           "| group | first (MiB) | again, last (MiB) | difference | left allocated after it (MiB) |",
           "|---|---|---|---|---|"]
    md += [f"| {g} | {a:,.0f} | {b:,.0f} | {(b - a) / a:+.2%} | {leak} |" for g, a, b, leak in repeats]
    md.append("")

    all_skips = {}
    for model in dict.fromkeys(x["model"] for x in first):
        rows = [x for x in first if x["model"] == model]
        ok = [x for x in rows if x["outcome"] == "complete"]
        analytic = [_err(x["analytic_peak"], x["peak_mem_mib"]) for x in ok]
        groups = [[x for x in rows if x["group"] == g] for g in dict.fromkeys(x["group"] for x in rows)]
        per_study = _scenario(groups, 3, orders, margin, card, seed=0)
        mixed = _scenario([rows], 5, orders, margin, card, seed=1)
        all_skips[model] = per_study["skips"]
        entry = {"configs": len(rows), "oom_on_card": len(rows) - len(ok),
                 "analytic_mean": statistics.fmean(analytic), "analytic_worst": max(analytic),
                 "per_study": {k: v for k, v in per_study.items() if k != "per_config"},
                 "mixed": {k: v for k, v in mixed.items() if k != "per_config"}}
        summary["models"][model] = entry
        md += [f"### {model}", "",
               f"{len(rows)} configs in {len(groups)} groups, {entry['oom_on_card']} out of memory on the card. Absolute "
               f"error of the predicted peak (CUDA max reserved) against the measured one, over the {len(ok)} that ran:", "",
               f"- analytic model alone, before any trial: mean **{entry['analytic_mean']:.1%}**, worst "
               f"**{entry['analytic_worst']:.1%}**;",
               f"- calibrated per study (each group a study, on its first 3 trials; judged on the rest): mean "
               f"**{per_study['mean']:.1%}**, worst **{per_study['worst_median_over_orders']:.1%}** (median over orders; "
               f"90th percentile {per_study['worst_p90_over_orders']:.1%}, largest in any order "
               f"{per_study['worst_any']:.1%});",
               f"- calibrated across groups (all its groups one study, on its first 5 trials): mean "
               f"**{mixed['mean']:.1%}**, worst {mixed['worst_median_over_orders']:.1%} (median over orders; 90th "
               f"percentile {mixed['worst_p90_over_orders']:.1%}).", "",
               "| seq | checkpointing | batch | accum | r | measured (MiB) | analytic (MiB) | error | calibrated per study, median error |",
               "|---|---|---|---|---|---|---|---|---|"]
        for x in rows:
            if x["outcome"] == "oom":
                md.append(f"| {x['max_seq_length']} | {x['gradient_checkpointing']} | {x['batch_size']} | "
                          f"{x['grad_accum']} | {x['lora_r']} | out of memory | {x['analytic_total']:,.0f} (with context) | | |")
                continue
            cal = per_study["per_config"].get(id(x), [])
            md.append(f"| {x['max_seq_length']} | {x['gradient_checkpointing']} | {x['batch_size']} | {x['grad_accum']} | "
                      f"{x['lora_r']} | {x['peak_mem_mib']:,.0f} | {x['analytic_peak']:,.0f} | "
                      f"{(x['analytic_peak'] - x['peak_mem_mib']) / x['peak_mem_mib']:+.1%} | "
                      f"{format(statistics.median(cal), '.1%') if cal else '—'} |")
        md.append("")

    md += ["### Out-of-memory skipping (calibrated per study, as above)", "",
           f"Skipped: calibrated prediction × (1 + {margin:.0%}) over the limit (the card: with the CUDA context; "
           f"a `memory_budget_mib`: the allocator's peak, and a config is over it when its measured peak is). "
           f"Counted over every judged config of every order, both models.", "",
           "| limit | judged configs over it | of those, skipped | judged configs that fit | of those, wrongly skipped |",
           "|---|---|---|---|---|"]
    summary["skips"] = {}
    for label in next(iter(all_skips.values())):
        over = sum(s[label]["over"] for s in all_skips.values())
        fit = sum(s[label]["fit"] for s in all_skips.values())
        caught = sum((s[label]["caught"] or 0) * s[label]["over"] for s in all_skips.values())
        wrong = sum((s[label]["wrongly_skipped"] or 0) * s[label]["fit"] for s in all_skips.values())
        summary["skips"][label] = {"over": over, "caught": caught / over if over else None, "fit": fit,
                                   "wrongly_skipped": wrong / fit if fit else None}
        md.append(f"| {label} | {over:,} | {format(caught / over, '.1%') if over else '—'} | {fit:,} | "
                  f"{format(wrong / fit, '.1%') if fit else '—'} |")
    (out / "report.md").write_text("\n".join(md) + "\n")
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    print("\n".join(md))
    return summary


def _quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", type=Path, required=True)
    r.add_argument("--models", default="mistral-7b-v0.3,mistral-1b")
    p = sub.add_parser("report")
    p.add_argument("out", type=Path)
    args = ap.parse_args()
    if args.cmd == "run":
        run(args.out, args.models.split(","))
    else:
        report(args.out)


if __name__ == "__main__":
    main()
