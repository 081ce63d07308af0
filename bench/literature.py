"""Reproduce the claims of "LoRA Without Regret" (Thinking Machines, 2025) on a base that learns.

    python bench/literature.py run --out DIR [--base mistral-125m-base] [--workers 6] [--deadline-s 540]
    python bench/literature.py report DIR [--md bench/LITERATURE-table.md] [--plots bench/literature]

``run`` pretrains the base once (cached; :mod:`harness.worker.pretrain`), tokenizes the King James
Bible through the harness's own ``prepare`` (text the base never saw), then trains every point of
the grids below with the harness's training loop (``harness.worker.loop.train``: AdamW, the
data-driven warm-up and linear decay, equal token budgets, validation on the same unpacked rows),
several runs at a time on one GPU in worker processes. Results go to ``DIR/runs.jsonl`` one line
per run as it ends; running the same command again skips the runs already there (a GPU call has a
time limit, so the study may take several). ``report`` turns them into the table and the plots.

The claims, and the runs for each:
  (a) alpha fixed at 32 (scale alpha/r): the best learning rate barely changes with rank
      -> a learning-rate grid for ranks 1, 4, 16, 64, 256 (all linear layers), two seeds;
  (b) the best LoRA learning rate is ~10x the best full fine-tuning one (~15x under 100 steps)
      -> the same grid for full fine-tuning;
  (c) LoRA loses more than full fine-tuning as the batch grows, and rank does not fix it
      -> r 16, r 256 and full at larger batches, each over a learning-rate grid;
  (d) LoRA on attention only underperforms LoRA on all linear layers
      -> r 16 and r 64 on q, k, v, o only.

Both methods train fp32 master weights under bf16 autocast on a GPU (pure bf16 weights would
lose full fine-tuning's small updates and bias claim (b)); plain transformers + PEFT load each
run's model, since one process trains many configurations in a row.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
ALPHA = 32
LORA_LRS = [2.5e-4 * 2**k for k in range(9)]  # 2.5e-4 .. 6.4e-2
FULL_LRS = [2.5e-5 * 2**k for k in range(9)]  # 2.5e-5 .. 6.4e-3


def grid(base_batch: int, seeds: int, quick: bool) -> list[dict]:
    """Every run, in the order they should happen if time runs short: claims (a, b) first, one
    seed at a time, then (d), then (c)."""
    runs = []

    def add(claim, method, rank, targets, lrs, batch, seed):
        for lr in lrs:
            runs.append(dict(claim=claim, method=method, rank=rank, targets=targets, lr=lr, batch=batch, seed=seed))

    ranks = [1, 4, 16, 64, 256]
    lora_lrs, full_lrs = LORA_LRS, FULL_LRS
    if quick:  # a smoke test of the machinery, not of the claims
        ranks, lora_lrs, full_lrs = [4], LORA_LRS[3:5], FULL_LRS[5:7]
    for seed in range(seeds):
        for rank in ranks:
            add("ab", "lora", rank, "all", lora_lrs, base_batch, seed)
        add("ab", "full", None, "all", full_lrs, base_batch, seed)
    if quick:
        return runs
    for seed in range(seeds):
        add("d", "lora", 16, "attention", lora_lrs, base_batch, seed)
    for batch in (4 * base_batch, 8 * base_batch):
        # Five points a factor 2 apart around the base batch's best (larger batches want more).
        for method, rank, lrs in (("lora", 16, lora_lrs[2:7]), ("lora", 256, lora_lrs[2:7]), ("full", None, full_lrs[3:8])):
            add("c", method, rank, "all", lrs, batch, 0)
    return runs


def key(run: dict) -> str:
    return json.dumps({k: run[k] for k in ("claim", "method", "rank", "targets", "lr", "batch", "seed")},
                      sort_keys=True)


# -- run ---------------------------------------------------------------------------------------

def sweep_config(base: str, seq_len: int, val_rows: int):
    from harness.sweep.config import SweepConfig

    return SweepConfig.model_validate({
        "study": "literature", "seed": 0, "model": {"name": base},
        "dataset": {"source": "kjv", "columns": {"text": "text"}, "val_fraction": 0.02, "max_val_rows": val_rows},
        "max_seq_length": seq_len, "search_space": {"batch_size": 8, "packing": "naive"},
    })


def train_one(run: dict, prepared, rows, args, device: str) -> dict:
    """One run: a fresh model from the base folder, LoRA or full, trained by the harness's loop."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from harness.params import TrainParams
    from harness.worker import loop
    from harness.worker.step import DataBudget, seed_everything

    train_rows, val_rows = rows
    seed_everything(run["seed"])
    model = AutoModelForCausalLM.from_pretrained(prepared.model_dir, dtype=torch.float32,
                                                 attn_implementation="sdpa").to(device)
    if getattr(model, "is_gradient_checkpointing", False):
        model.gradient_checkpointing_disable()  # a 125M model does not need it; with it, frozen inputs stop LoRA's gradients
    if run["method"] == "lora":
        model.enable_input_require_grads()
        targets = ALL_LINEAR if run["targets"] == "all" else ATTENTION
        model = get_peft_model(model, LoraConfig(r=run["rank"], lora_alpha=ALPHA, lora_dropout=0.0,
                                                 target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    trainable, total = loop.parameter_counts(model)
    micro = min(run["batch"], args.max_micro_batch)
    params = TrainParams(method=run["method"], batch_size=micro, grad_accum=run["batch"] // micro,
                         learning_rate=run["lr"], lora_r=run["rank"] or 0, lora_alpha=ALPHA, lora_dropout=0.0,
                         epochs=1, weight_decay=0.0, warmup_ratio=args.warmup_ratio, packing="naive",
                         batching="random", max_tokens_per_batch=0)
    budget = DataBudget("tokens", args.tokens, args.tokens)  # validated at the end (and before the first step)
    t0 = time.perf_counter()
    # cache_enabled=False: autocast caches the bf16 copy of each trainable weight until its context
    # exits, so one context around the whole loop would train the fp32 weights while every forward
    # kept using their first copy (found the hard way: LoRA's validation loss never moved).
    with torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda", cache_enabled=False):
        try:
            result = loop.train(model, train_rows, val_rows, params, pad_id=0, device=device, seed=run["seed"],
                                max_seq_length=args.seq_len, budget=budget, timing_warmup_steps=2,
                                on_step=lambda *a: None, on_eval=lambda *a: None,
                                evaluate_start=args.evaluate_start)
            val, start, diverged = result.val_loss, result.val_loss_start, False
            if run["method"] == "lora" and all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters()
                                               if "lora_B" in n):
                raise RuntimeError("the adapter did not train: every lora_B weight is still zero")
        except loop.NonFiniteLoss:
            result, val, start, diverged = None, math.inf, None, True
    out = dict(run, val_loss=val, val_loss_start=start, diverged=diverged, trainable_params=trainable,
               steps=result.steps if result else None, tokens=result.tokens_trained if result else None,
               tokens_per_s=result.tokens_per_s if result else None, seconds=round(time.perf_counter() - t0, 2))
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return out


def worker(index: int, todo, done, prepared_json: str, args) -> None:
    import gc

    from harness.data.prepare import Prepared
    from harness.worker import loop  # plain transformers + PEFT: this process never imports unsloth

    prepared = Prepared.load(Path(prepared_json))
    rows = (loop.load_rows(prepared.train_tokens), loop.load_rows(prepared.val_tokens))
    device = "cuda" if loop.torch.cuda.is_available() else "cpu"
    gc.freeze()
    while (run := todo.get()) is not None:
        try:
            done.put(train_one(run, prepared, rows, args, device))
        except Exception as err:  # noqa: BLE001 - one run's failure is recorded, the rest go on
            done.put(dict(run, error=f"{type(err).__name__}: {err}"[:500]))


def run(args) -> int:
    import multiprocessing as mp

    from harness.worker.prepare import prepare

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # The base is pretrained here on first use (on the GPU, in this process), then cached.
    prepared = prepare(sweep_config(args.base, args.seq_len, args.val_rows), ROOT)
    (out / "prepared.json").write_text(json.dumps(prepared.__dict__, indent=1, default=str))
    base = json.loads((Path(prepared.model_dir) / "pretrain.json").read_text())
    base.pop("curve", None)
    (out / "base.json").write_text(json.dumps(base, indent=1))
    print(f"base {args.base}: held-out loss {base['held_out_loss']} after {base['tokens_trained']:,} tokens "
          f"in {base['seconds']} s on {base['device']}", flush=True)
    # Preflight: a short LoRA run here must move its adapter and the loss, or no grid is worth running.
    from harness.worker import loop

    probe_args = argparse.Namespace(**{**vars(args), "tokens": 30 * args.batch * args.seq_len, "evaluate_start": True})
    rows = (loop.load_rows(prepared.train_tokens), loop.load_rows(prepared.val_tokens))
    probe = train_one(dict(claim="preflight", method="lora", rank=16, targets="all", lr=8e-3, batch=args.batch, seed=0),
                      prepared, rows, probe_args, "cuda" if loop.torch.cuda.is_available() else "cpu")
    print(f"preflight LoRA run: validation loss {probe['val_loss_start']:.6f} -> {probe['val_loss']:.6f} "
          f"in {probe['seconds']} s", flush=True)
    if not probe["val_loss"] < probe["val_loss_start"] - 1e-3:
        print("preflight failed: the LoRA run did not lower the loss", flush=True)
        return 1
    results_file = out / "runs.jsonl"
    finished = {key(json.loads(line)) for line in results_file.read_text().splitlines()} if results_file.exists() else set()
    pending = [r for r in grid(args.batch, args.seeds, args.quick) if key(r) not in finished]
    print(f"{len(finished)} runs already done, {len(pending)} to go, {args.workers} at a time", flush=True)
    ctx = mp.get_context("spawn")  # CUDA is initialised here: workers must not be forks
    todo, done = ctx.Queue(), ctx.Queue()
    for r in pending:
        todo.put(r)
    procs = [ctx.Process(target=worker, args=(i, todo, done, str(out / "prepared.json"), args))
             for i in range(args.workers)]
    for p in procs:
        todo.put(None)
    for p in procs:
        p.start()
    received, stopped = 0, False
    with results_file.open("a") as f:
        while received < len(pending):
            if not stopped and time.monotonic() - started > args.deadline_s:
                # Take back what has not started: those runs wait for the next call.
                while True:
                    try:
                        if todo.get(timeout=0.1) is not None:
                            pending.pop()
                    except Exception:  # queue.Empty
                        break
                stopped = True
                print("deadline: no more runs start in this call", flush=True)
            try:
                res = done.get(timeout=5)
            except Exception:  # queue.Empty
                if not any(p.is_alive() for p in procs):
                    break
                continue
            received += 1
            f.write(json.dumps(res) + "\n")
            f.flush()
            shown = res.get("error") or f"val {res['val_loss']:.4f} in {res['seconds']}s"
            print(f"[{received}/{len(pending)}] {res['claim']} {res['method']} r={res['rank']} {res['targets']} "
                  f"lr={res['lr']:.3g} batch={res['batch']} seed={res['seed']}: {shown}", flush=True)
    for p in procs:
        p.join(timeout=30)
        if p.is_alive():
            p.kill()
    left = len(grid(args.batch, args.seeds, args.quick)) - len(finished) - received
    print(f"done in {time.monotonic() - started:.0f}s; {left} runs left for a later call", flush=True)
    return 0


# -- report ------------------------------------------------------------------------------------

def best_lr(points: list[tuple[float, float]]) -> tuple[float, float, bool]:
    """(best learning rate, its loss, at the grid's edge?): a parabola in log(lr) through the
    lowest point and its neighbours, so the estimate is finer than the grid's factor of 2."""
    pts = sorted((lr, loss) for lr, loss in points if math.isfinite(loss))
    i = min(range(len(pts)), key=lambda j: pts[j][1])
    if i == 0 or i == len(pts) - 1:
        return pts[i][0], pts[i][1], True
    (x0, y0), (x1, y1), (x2, y2) = [(math.log(lr), loss) for lr, loss in pts[i - 1 : i + 2]]
    denom = (x0 - x1) * (x0 - x2) * (x1 - x2)
    a = (x2 * (y1 - y0) + x1 * (y0 - y2) + x0 * (y2 - y1)) / denom
    b = (x2**2 * (y0 - y1) + x1**2 * (y2 - y0) + x0**2 * (y1 - y2)) / denom
    if a <= 0:
        return pts[i][0], pts[i][1], False
    x = min(max(-b / (2 * a), x0), x2)
    c = y1 - a * x1 * x1 - b * x1
    return math.exp(x), a * x * x + b * x + c, False


def curves(rows: list[dict]) -> dict[tuple, dict[float, list[float]]]:
    """(claim, method, rank, targets, batch) -> lr -> [val loss per seed]."""
    table: dict[tuple, dict[float, list[float]]] = {}
    for r in rows:
        if "error" in r:
            continue
        label = (r["claim"], r["method"], r["rank"], r["targets"], r["batch"])
        table.setdefault(label, {}).setdefault(r["lr"], []).append(r["val_loss"])
    return table


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if all(math.isfinite(x) for x in xs) else math.inf


def report(args) -> int:
    rows = [json.loads(line) for line in (Path(args.dir) / "runs.jsonl").read_text().splitlines()]
    base = json.loads((Path(args.dir) / "base.json").read_text())
    table = curves(rows)
    errors = [r for r in rows if "error" in r]
    summary = []
    for label, by_lr in sorted(table.items(), key=lambda kv: (kv[0][0], kv[0][4], kv[0][1], kv[0][3], kv[0][2] or 1e9)):
        claim, method, rank, targets, batch = label
        means = sorted((lr, mean(v)) for lr, v in by_lr.items())
        # The grid's best point is the answer; the parabola only refines where between points it lies
        # (near the divergence cliff it can overshoot, so its loss is not used).
        best_grid, loss = min(means, key=lambda t: t[1])
        edge = best_grid in (means[0][0], means[-1][0])
        refined = best_lr(means)[0]
        seeds = max(len(v) for v in by_lr.values())
        spread = by_lr[best_grid]  # seed noise: half the range between seeds at the best point
        noise = (max(spread) - min(spread)) / 2 if len(spread) > 1 else None
        summary.append(dict(claim=claim, method=method, rank=rank, targets=targets, batch=batch, best_lr=best_grid,
                            refined_lr=refined, best_loss=loss, edge=edge, seeds=seeds, noise=noise, points=len(by_lr),
                            steps=next(r["steps"] for r in rows if r.get("steps") and r["batch"] == batch),
                            trainable=next(r["trainable_params"] for r in rows if "error" not in r and
                                           (r["method"], r["rank"], r["targets"]) == (method, rank, targets))))
    Path(args.dir, "summary.json").write_text(json.dumps(summary, indent=1))
    lines = ["| claim | method | rank | targets | batch (seqs) | steps | trainable params | LR points × seeds | "
             "best LR (grid) | refined LR | loss at best LR | seed noise (±) |", "|" + "---|" * 12]
    for s in summary:
        noise = "—" if s["noise"] is None else f"{s['noise']:.4f}"
        lines.append(f"| {s['claim']} | {s['method']} | {s['rank'] or '—'} | {s['targets']} | {s['batch']} | {s['steps']} | "
                     f"{s['trainable']:,} | {s['points']} × {s['seeds']} | {s['best_lr']:.3g}{' (edge)' if s['edge'] else ''} | "
                     f"{s['refined_lr']:.2g} | "
                     f"{s['best_loss']:.4f} | {noise} |")
    md = "\n".join(lines) + "\n"
    if errors:
        md += f"\n{len(errors)} runs failed: " + "; ".join(sorted({e['error'][:80] for e in errors})) + "\n"
    Path(args.md).write_text(md)
    print(md)
    print(f"base: {base}")
    plots(table, Path(args.plots))
    return 0


def plots(table, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    groups = {"ab": "loss against learning rate per rank (all linear layers, alpha 32) and full fine-tuning",
              "c": "batch size: r 16, r 256 and full", "d": "attention only vs all linear layers"}
    for claim, title in groups.items():
        fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
        shown = 0
        for label, by_lr in sorted(table.items(), key=lambda kv: (kv[0][1], kv[0][2] or 1e9, kv[0][4])):
            c, method, rank, targets, batch = label
            if c != claim and not (claim == "d" and c == "ab" and rank == 16 and method == "lora") \
                    and not (claim == "c" and c == "ab" and (method == "full" or rank in (16, 256))):
                continue
            lrs = sorted(by_lr)
            ys = [mean(by_lr[lr]) for lr in lrs]
            name = ("full" if method == "full" else f"r={rank}") + (" attention" if targets == "attention" else "") \
                + (f" batch {batch}" if claim == "c" else "")
            ax.plot(lrs, [y if math.isfinite(y) else float("nan") for y in ys], marker="o", ms=3,
                    ls="--" if method == "full" else "-", label=name)
            shown += 1
        if not shown:
            plt.close(fig)
            continue
        ax.set(xscale="log", xlabel="learning rate", ylabel="validation loss (KJV)", title=title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
        fig.tight_layout()
        fig.savefig(out / f"claim-{claim}.png")
        plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", required=True)
    r.add_argument("--base", default="mistral-125m-base")
    r.add_argument("--tokens", type=int, default=500_000, help="training tokens per run (every run alike)")
    r.add_argument("--seq-len", type=int, default=512)
    r.add_argument("--batch", type=int, default=8, help="sequences per optimizer step for claims a, b, d")
    r.add_argument("--max-micro-batch", type=int, default=16)
    r.add_argument("--seeds", type=int, default=2)
    r.add_argument("--val-rows", type=int, default=256)
    r.add_argument("--evaluate-start", action="store_true", help="also validate before the first step (the base's loss)")
    r.add_argument("--warmup-ratio", type=float, default=0.05)
    r.add_argument("--workers", type=int, default=6)
    r.add_argument("--deadline-s", type=float, default=1e9, help="start no run after this many seconds")
    r.add_argument("--quick", action="store_true", help="a few runs: checks the machinery, not the claims")
    rep = sub.add_parser("report")
    rep.add_argument("dir")
    rep.add_argument("--md", default="bench/literature/table.md")
    rep.add_argument("--plots", default="bench/literature")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    return run(args) if args.command == "run" else report(args)


if __name__ == "__main__":
    sys.exit(main())
