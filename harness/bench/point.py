"""One benchmark point in its own process: ``python -m harness.bench.point SPEC.json OUT.json``.

For ``backend: hf`` this process never imports unsloth (Unsloth patches transformers globally,
so a baseline must run where it was never loaded). Each step trains on a fixed batch of
``batch_size x seq_len`` random tokens: no padding, so every token counts and every backend
computes the same work. Memory, out-of-memory and FLOP measurements come from
``harness.worker.metrics``, the same code that measures a sweep's trials.

MFU is reported three ways: ``mfu`` (FLOPs a LoRA step really runs, against the data sheet's
peak), ``mfu_6n`` (PaLM's conventional 6·N + 12·L·A·Q, against the same peak, as papers
report it) and ``mfu_measured`` (the real FLOPs against a bf16 matmul's measured FLOP/s).
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from harness import env
from harness.files import write_json_atomic

SPAWNED_AT = float(os.environ.get(env.SPAWNED_AT, time.time()))


def run(spec: dict) -> dict:
    """Load the model, train ``warmup_steps + steps`` steps on one fixed batch, and measure.

    Out of memory is a result (``status: oom``), not a crash; any other error propagates.
    """
    t0 = time.perf_counter()
    if spec["backend"] == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers and peft)
    import torch

    from harness.worker import metrics
    from harness.worker.prepare import resolve_model_name

    import_s = time.perf_counter() - t0
    device = "cuda" if spec["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    out: dict = {"status": "ok", "device": device, "import_s": round(import_s, 3),
                 "spawn_s": round(time.time() - SPAWNED_AT - import_s, 3),
                 "gpu_name": torch.cuda.get_device_name() if device == "cuda" else None}
    model_dir = resolve_model_name(spec["model"], spec["seed"])
    metrics.reset_peak_memory(device)
    try:
        _train(spec, model_dir, device, dtype, out)
    except Exception as err:  # noqa: BLE001 - only out-of-memory is handled here; the rest re-raises
        if not metrics.is_out_of_memory(err):
            raise
        # Measured before anything is freed: what was held when the allocator said no.
        out.update(status="oom", error=metrics.failure_message(err), mem_at_failure_mib=metrics.memory_in_use(device))
    out["unsloth_imported"] = "unsloth" in sys.modules  # must stay False for the hf baseline
    # Peaks last, so they cover loading, training and a failed allocation alike.
    out.update(metrics.memory_peaks(device))
    _against_measured_peak(device, out)
    return out


def _against_measured_peak(device: str, out: dict) -> None:
    """``peak_measured_flops`` (a large bf16 matmul's FLOP/s on this card) and ``mfu_measured``
    (the step's model FLOP/s against it); None on CPU and for a point that did not train.

    Measured last, after the memory peaks are read, so its 384 MiB count in no peak and nothing it
    starts up (cuBLAS's kernel choice) counts in a load or step time; and on a card warm from
    training, at the clocks the steps ran at.
    """
    from harness.worker import metrics

    out.update(peak_measured_flops=None, mfu_measured=None)
    if device != "cuda" or out["status"] != "ok":
        return
    try:
        peak = metrics.measured_peak_flops(device)
    except Exception as err:  # noqa: BLE001 - a point's results outweigh this extra figure
        if not metrics.is_out_of_memory(err):
            raise
        return
    out.update(peak_measured_flops=round(peak),
               mfu_measured=metrics.mfu(out["flops_per_token"], out["tokens_per_s"], peak))


def _train(spec: dict, model_dir: str, device: str, dtype, out: dict) -> None:
    """The measured part: load, then train; writes into ``out`` as it goes, so a point that runs out
    of memory while training still reports how long loading took."""
    import torch  # already imported by run(), after unsloth where that is wanted

    from harness.worker import backends, metrics

    lora = dict(lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                target_modules=spec["target_modules"], checkpointing=spec["gradient_checkpointing"], seed=spec["seed"])
    t0 = time.perf_counter()
    if spec["backend"] == "unsloth":
        model, _ = backends.load_unsloth(model_dir, max_seq_length=spec["seq_len"], dtype=dtype,
                                         load_in_4bit=False, **lora)
    else:
        model, _ = backends.load_hf(model_dir, dtype=dtype, device=device, **lora)
    out["load_s"] = round(time.perf_counter() - t0, 3)
    # FLOPs per token from the loaded model's shapes (before training: a model this cannot read
    # fails at once, not after the steps). "unsloth" checkpointing recomputes like "true" does.
    checkpointing = bool(backends.gradient_checkpointing(spec["gradient_checkpointing"]))
    shape = metrics.model_shape(model)
    flops = metrics.flops_per_token(shape, spec["seq_len"], method="lora", checkpointing=checkpointing,
                                    lora_rank=spec["lora_r"], lora_targets=spec["target_modules"])
    flops_6n = metrics.flops_per_token(shape, spec["seq_len"], method="full", checkpointing=False)  # PaLM's
    out.update(flops_per_token=flops, flops_per_token_6n=flops_6n,
               flops_formula=metrics.flops_formula("lora", checkpointing))
    model.train()
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, model.config.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=gen).to(device)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    times = []
    for step in range(spec["warmup_steps"] + spec["steps"]):
        if device == "cuda":
            torch.cuda.synchronize()  # time this step's kernels only, not the queue left by the last one
        t = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= spec["warmup_steps"]:
            times.append(time.perf_counter() - t)
    step_s = statistics.median(times)
    tokens_per_s = spec["batch_size"] * spec["seq_len"] / step_s
    peak = metrics.peak_flops(out["gpu_name"])  # the data sheet's; the measured one comes last, in run()
    out.update(step_s=round(step_s, 5), step_s_all=[round(t, 5) for t in times], tokens_per_s=round(tokens_per_s, 1),
               loss=float(loss.detach()), model_flops_per_s=round(flops * tokens_per_s), peak_flops=peak,
               mfu=metrics.mfu(flops, tokens_per_s, peak), mfu_6n=metrics.mfu(flops_6n, tokens_per_s, peak))


def main(argv: list[str] | None = None) -> int:
    """Run the point in SPEC.json and write its result to OUT.json (atomically: the driver reads it)."""
    spec_path, out_path = (argv or sys.argv[1:])[:2]
    result = run(json.loads(Path(spec_path).read_text()))
    write_json_atomic(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
