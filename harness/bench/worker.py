"""One benchmark point in its own process: ``python -m harness.bench.worker SPEC.json OUT.json``.

For ``backend: hf`` this process never imports unsloth (Unsloth patches transformers globally,
so a baseline must run where it was never loaded). Each step trains on a fixed batch of
``batch_size x seq_len`` random tokens: no padding, so every token counts and every backend
computes the same work.
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

from harness.files import write_json_atomic

SPAWNED_AT = float(os.environ.get("HARNESS_SPAWNED_AT", time.time()))

# Peak dense bf16 tensor throughput, FLOP/s, by a substring of the device name (vendor data sheets).
PEAK_BF16_FLOPS = {"H200": 989e12, "H100 PCIe": 756e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12,
                   "A10G": 70e12, "L4": 121e12}


def peak_flops(gpu_name: str | None) -> float | None:
    if not gpu_name:
        return None
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in gpu_name), None)


def flops_per_token(model, seq_len: int) -> float:
    """PaLM's estimate (Chowdhery et al. 2022, appendix B): 6·N + 12·L·H·Q, N = parameters outside
    the input embedding, L layers, H hidden size, Q sequence length. It counts weight gradients
    that LoRA skips, so it is the conventional model FLOPs, not the FLOPs actually executed."""
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    n = sum(p.numel() for p in model.parameters()) - embed
    return 6 * n + 12 * cfg.num_hidden_layers * cfg.hidden_size * seq_len


def run(spec: dict) -> dict:
    t0 = time.perf_counter()
    if spec["backend"] == "unsloth":
        import unsloth  # noqa: F401  (first: it patches transformers and peft)
    import torch

    from harness.worker import backends
    from harness.data.prepare import resolve_model_name

    import_s = time.perf_counter() - t0
    device = "cuda" if spec["device"] in ("auto", "cuda") and torch.cuda.is_available() else "cpu"
    dtype = getattr(torch, spec["dtype"]) if spec["dtype"] != "auto" else (torch.bfloat16 if device == "cuda" else torch.float32)
    out: dict = {"status": "ok", "device": device, "import_s": round(import_s, 3),
                 "spawn_s": round(time.time() - SPAWNED_AT - import_s, 3),
                 "gpu_name": torch.cuda.get_device_name() if device == "cuda" else None}
    model_dir = resolve_model_name(spec["model"], spec["seed"])
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    lora = dict(lora_r=spec["lora_r"], lora_alpha=spec["lora_alpha"], lora_dropout=0.0,
                target_modules=spec["target_modules"], checkpointing=spec["gradient_checkpointing"], seed=spec["seed"])
    try:
        t0 = time.perf_counter()
        if spec["backend"] == "unsloth":
            model, _ = backends.load_unsloth(model_dir, max_seq_length=spec["seq_len"], dtype=dtype,
                                             load_in_4bit=False, **lora)
        else:
            model, _ = backends.load_hf(model_dir, dtype=dtype, device=device, **lora)
        out["load_s"] = round(time.perf_counter() - t0, 3)
        model.train()
        gen = torch.Generator().manual_seed(spec["seed"])
        ids = torch.randint(0, model.config.vocab_size, (spec["batch_size"], spec["seq_len"]), generator=gen).to(device)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
        times = []
        for step in range(spec["warmup_steps"] + spec["steps"]):
            if device == "cuda":
                torch.cuda.synchronize()
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
        tokens = spec["batch_size"] * spec["seq_len"]
        out.update(step_s=round(step_s, 5), step_s_all=[round(t, 5) for t in times], tokens_per_s=round(tokens / step_s, 1),
                   loss=float(loss.detach()))
        peak = peak_flops(out["gpu_name"])
        out["mfu"] = round(flops_per_token(model, spec["seq_len"]) * tokens / step_s / peak, 4) if peak else None
    except (torch.OutOfMemoryError, MemoryError):
        out["status"] = "oom"
    except RuntimeError as err:  # the CPU allocator reports failure as a RuntimeError
        if "can't allocate memory" not in str(err):
            raise
        out["status"] = "oom"
        out["error"] = str(err).splitlines()[0][:200]
    out["unsloth_imported"] = "unsloth" in sys.modules  # must stay False for the hf baseline
    if device == "cuda":
        out["peak_alloc_mib"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        out["peak_reserved_mib"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
        if out["status"] == "oom":
            out["mem_at_failure_mib"] = round(torch.cuda.memory_reserved() / 2**20, 1)
    else:
        import resource

        out["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    return out


def main(argv: list[str] | None = None) -> int:
    spec_path, out_path = (argv or sys.argv[1:])[:2]
    result = run(json.loads(Path(spec_path).read_text()))
    write_json_atomic(out_path, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
