"""Issue 16's bench, the parts ``bench/gpu_packing.sh`` runs besides harness studies.

    python bench/gpu_packing.py sft STUDY_DIR --out sft.json [--device cuda]
    python bench/gpu_packing.py table STUDY_DIR [STUDY_DIR ...] --sft sft.json --out packing.md

``sft``: Unsloth's own SFT trainer (trl's ``SFTTrainer`` as ``import unsloth`` patches it) on the
study's model, rows and config: the same tokenized training rows (from the study's token cache,
passed pre-tokenized so both see the very same tokens), batch, accumulation, LoRA rank and alpha,
learning rate, warm-up, weight decay, AdamW and gradient clipping, and Unsloth's gradient
checkpointing. Everything else is the trainer's default for this version: ``padding_free`` and
``packing`` are left unset, so Unsloth decides (``unsloth/utils/padding_choice.py``; on an H100,
sm90, it keeps padding-free). It trains until the study's token budget of non-padding tokens
(the learning-rate schedule spans the steps that budget is expected to take), then computes the
validation loss exactly as a harness trial does (``loop.evaluate`` on the study's validation rows).
Non-padding tokens/s leave the first ``timing_warmup_steps`` steps out, as a trial does, and time
optimizer steps from the first micro-batch's forward to the optimizer step (the trainer fetches
and collates a step's batches before that). The JSON records what the trainer actually did:
its resolved ``padding_free``/``packing`` and how many micro-batches carried ``packed_seq_lengths``.

``table``: the studies' trials (read from their storage with Optuna; no polars) beside that run,
as markdown.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def study_params(study_dir: Path, cfg, trial: int | None) -> dict:
    """The study's fixed hyperparameters, or with ``trial`` that trial's full set (the
    throughput sweep's first trial is the Unsloth default it is measured against)."""
    if trial is None:
        return cfg.search_space.fixed()
    import optuna

    from harness.sweep.storage import default_storage, make_storage
    from harness.sweep.study import trial_params

    study = optuna.load_study(study_name=cfg.study, storage=make_storage(cfg.storage or default_storage(study_dir)))
    return trial_params(next(t for t in study.get_trials(deepcopy=False) if t.number == trial), cfg)


def sft(study_dir: Path, out: Path, device: str, trial: int | None = None) -> None:
    t_start = time.perf_counter()
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)
    from unsloth import FastLanguageModel

    import numpy as np
    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import SFTConfig, SFTTrainer

    from harness.data.prepare import Prepared
    from harness.sweep.config import SweepConfig
    from harness.worker import backends, loop

    import_s = time.perf_counter() - t_start
    cfg = SweepConfig.model_validate_json((study_dir / "sweep.json").read_text())
    prepared = Prepared.load(study_dir / "prepared.json")
    fixed = study_params(study_dir, cfg, trial)
    need = ("batch_size", "grad_accum", "learning_rate", "lora_r", "lora_alpha", "warmup_ratio", "weight_decay")
    missing = [k for k in need if k not in fixed]
    if missing or cfg.budget.tokens is None:
        raise SystemExit(f"the study must fix {', '.join(need)} and give budget.tokens (searched: {missing})")
    budget = int(cfg.budget.tokens)
    train_rows, val_rows = loop.load_rows(prepared.train_tokens), loop.load_rows(prepared.val_tokens)
    if any(mask is not None for _, mask in train_rows[:1]):
        raise SystemExit("rows with a loss mask (train_on_responses_only) are not supported here")

    t0 = time.perf_counter()
    dtype = loop.resolve_dtype(cfg.model.dtype, device)
    model, tokenizer = FastLanguageModel.from_pretrained(model_name=prepared.model_dir,
                                                         max_seq_length=cfg.max_seq_length, dtype=dtype,
                                                         load_in_4bit=cfg.model.load_in_4bit)
    model = FastLanguageModel.get_peft_model(
        model, r=fixed["lora_r"], lora_alpha=fixed["lora_alpha"], lora_dropout=fixed.get("lora_dropout", 0.0),
        target_modules=cfg.model.target_modules, bias="none",
        use_gradient_checkpointing=backends.gradient_checkpointing(cfg.model.gradient_checkpointing),
        random_state=cfg.seed)
    load_s = time.perf_counter() - t0

    batch, accum = int(fixed["batch_size"]), int(fixed["grad_accum"])
    mean_len = float(np.mean([len(ids) for ids, _ in train_rows]))
    # The schedule's horizon: the steps the budget is expected to take (a harness trial's schedule
    # follows the tokens themselves, ending at the budget); training stops at the budget.
    max_steps = max(1, math.ceil(budget / (batch * accum * mean_len)))
    dataset = Dataset.from_dict({"input_ids": [ids.astype(np.int64).tolist() for ids, _ in train_rows]})

    seen = {"real": 0, "computed": 0, "micro_batches": 0, "packed": 0, "widths": []}
    steps: list[dict] = []

    class CountingTrainer(SFTTrainer):
        """Counts what each micro-batch holds; the training step itself is the trainer's."""

        def training_step(self, model, inputs, num_items_in_batch=None, *args, **kwargs):
            ids = inputs["input_ids"]
            seen["real"] += int(inputs["attention_mask"].sum()) if "attention_mask" in inputs else ids.numel()
            seen["computed"] += ids.numel()
            seen["micro_batches"] += 1
            seen["packed"] += int(inputs.get("packed_seq_lengths") is not None)
            seen["widths"].append(tuple(ids.shape))
            return super().training_step(model, inputs, num_items_in_batch, *args, **kwargs)

    class Timing(TrainerCallback):
        """Step times (synchronised) and the stop at the token budget."""

        def on_step_begin(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            self.t, self.tokens = time.perf_counter(), seen["real"]

        def on_step_end(self, args, state, control, **kw):
            if device == "cuda":
                torch.cuda.synchronize()
            steps.append({"s": time.perf_counter() - self.t, "tokens": seen["real"] - self.tokens})
            if seen["real"] >= budget:
                control.should_training_stop = True
            return control

    args = SFTConfig(
        output_dir="/tmp/sft-out", per_device_train_batch_size=batch, gradient_accumulation_steps=accum,
        max_steps=max_steps, learning_rate=float(fixed["learning_rate"]), lr_scheduler_type="linear",
        warmup_steps=float(fixed["warmup_ratio"]), weight_decay=float(fixed["weight_decay"]),
        optim="adamw_torch", max_grad_norm=1.0, seed=cfg.seed, bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16, max_length=cfg.max_seq_length, logging_steps=1, save_strategy="no",
        report_to="none", dataloader_num_workers=0,
    )
    t0 = time.perf_counter()  # peak memory counts from the process's start, the load included, as a trial's does
    trainer = CountingTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer,
                              callbacks=[Timing()])
    init_s = time.perf_counter() - t0
    resolved = {k: getattr(trainer.args, k, None) for k in ("padding_free", "packing", "max_length", "optim",
                                                            "per_device_train_batch_size", "gradient_accumulation_steps")}
    t0 = time.perf_counter()
    out_train = trainer.train()
    train_s = time.perf_counter() - t0
    warm = cfg.budget.timing_warmup_steps
    timed = steps[warm:] if len(steps) > warm else steps
    tokens_per_s = sum(s["tokens"] for s in timed) / sum(s["s"] for s in timed) if timed else None
    peak = loop.peak_memory(device)
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    record = {
        "trainer": f"{type(trainer).__mro__[1].__module__}.{type(trainer).__mro__[1].__name__}",
        "config": type(trainer.args).__name__, "resolved_args": {k: str(v) for k, v in resolved.items()},
        "budget_tokens": budget, "max_steps": max_steps, "steps": len(steps), "tokens_trained": seen["real"],
        "tokens_computed": seen["computed"],
        "padding_fraction": round(1 - seen["real"] / seen["computed"], 4) if seen["computed"] else None,
        "micro_batches": seen["micro_batches"], "micro_batches_with_packed_seq_lengths": seen["packed"],
        "first_shapes": [list(w) for w in seen["widths"][:4]],
        "tokens_per_s": tokens_per_s and round(tokens_per_s, 1), "timing_warmup_steps": warm,
        "train_loss_last": losses[-1] if losses else None, "train_loss_mean": out_train.training_loss,
        "peak_mem_mib": round(peak["peak_mem_mib"], 1), "import_s": round(import_s, 1), "load_s": round(load_s, 1),
        "init_s": round(init_s, 1), "train_s": round(train_s, 1),
        "gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu",
        "params": {k: fixed[k] for k in need}, "params_of_trial": trial,
    }
    out.write_text(json.dumps(record, indent=1))  # what training measured, before anything else can fail
    try:
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        if hasattr(FastLanguageModel, "for_training"):
            FastLanguageModel.for_training(model)  # the state a harness trial evaluates in
        t0 = time.perf_counter()
        record["val_loss"] = round(loop.evaluate(model, val_rows, pad_id, device), 6)
        record["eval_s"] = round(time.perf_counter() - t0, 1)
    except Exception as err:  # noqa: BLE001 - the training numbers above still stand
        record["val_loss_error"] = f"{type(err).__name__}: {err}"[:500]
    out.write_text(json.dumps(record, indent=1))
    print(json.dumps(record))


def table(study_dirs: list[Path], sft_json: Path | None, out: Path) -> None:
    """One row per trial (and the SFT run): what each config did with the same token budget. A
    multi-objective study's Pareto front is marked; with the SFT run, each row's non-padding
    tokens/s is also given as a multiple of the trainer's."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    sft_run = json.loads(sft_json.read_text()) if sft_json and sft_json.exists() else None
    base = sft_run and sft_run.get("tokens_per_s")
    rows = []
    for study_dir in study_dirs:
        cfg = json.loads((study_dir / "sweep.json").read_text())
        storage = cfg.get("storage") or f"sqlite:///{study_dir / 'study.db'}"
        study = optuna.load_study(study_name=cfg["study"], storage=storage)
        fixed = {k: v for k, v in cfg["search_space"].items() if not isinstance(v, dict)}
        front = {t.number for t in study.best_trials} if len(study.directions) > 1 else set()
        for t in study.trials:
            a = t.user_attrs
            p = {**fixed, **t.params}
            label = (f"harness, packing {p.get('packing')}, batching {p.get('batching', 'random')}, "
                     + (f"≤{p['max_tokens_per_batch']} tokens/micro-batch" if p.get("max_tokens_per_batch")
                        else f"batch {p.get('batch_size')}") + f" × accum {p.get('grad_accum')}"
                     + (f", lr {p['learning_rate']:.2g}" if "learning_rate" in t.params else "")
                     + (" (enqueued: the Unsloth default)" if a.get("enqueued") else "")
                     + (" **front**" if t.number in front else ""))
            tps = a.get("tokens_per_s")
            rows.append([label, t.state.name.lower(), a.get("tokens_trained"), a.get("steps"), tps,
                         round(tps / base, 2) if tps and base else None,
                         a.get("padded_tokens_per_s"), a.get("padding_fraction"), a.get("peak_mem_mib"),
                         a.get("val_loss"), a.get("train_s"), a.get("fixed_s")])
    if sft_run:
        s = sft_run
        rows.append([f"Unsloth SFTTrainer (defaults; padding_free resolved to {s['resolved_args'].get('padding_free')}, "
                     f"{s['micro_batches_with_packed_seq_lengths']}/{s['micro_batches']} micro-batches packed)",
                     "complete" if "val_loss" in s else "no val_loss", s["tokens_trained"], s["steps"], s["tokens_per_s"],
                     1.0, None, s["padding_fraction"], s["peak_mem_mib"], s.get("val_loss"), s["train_s"],
                     round(s["import_s"] + s["load_s"] + s["init_s"], 1)])
    head = ["run", "state", "tokens trained", "steps", "tokens/s (non-padding)", "× SFT trainer",
            "tokens/s (with padding)", "padding fraction", "peak reserved MiB", "val_loss", "train s", "fixed s"]

    def cell(v):
        return "" if v is None else f"{v:,.4f}" if isinstance(v, float) and abs(v) < 20 else \
            f"{v:,.0f}" if isinstance(v, (int, float)) else str(v)

    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows]
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("sft")
    a.add_argument("study_dir", type=Path)
    a.add_argument("--out", type=Path, required=True)
    a.add_argument("--device", default="cuda")
    a.add_argument("--trial", type=int, help="train that trial's config (default: the study's fixed values)")
    b = sub.add_parser("table")
    b.add_argument("study_dirs", type=Path, nargs="+")
    b.add_argument("--sft", type=Path)
    b.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "sft":
        os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
        sft(args.study_dir, args.out, args.device, args.trial)
    else:
        table(args.study_dirs, args.sft, args.out)


if __name__ == "__main__":
    main()
