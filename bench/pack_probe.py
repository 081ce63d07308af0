"""Issue 24's probe, on the harness's own pack path: one optimizer step of K LoRA trials trained
together on one base (harness/worker/multilora.py's batched adapters, the pack's AdamW), against
one trial on Unsloth's own path (PEFT's adapter, Unsloth's fused LoRA kernels), same rows, same
card, one process:

    python3 bench/pack_probe.py MODEL_DIR OUT.json [--ks 1,2,4,8,16,32] [--rows 2] [--tokens 48] [--steps 8]

Each trial's micro-batch is ``rows`` rows of ``tokens`` random tokens (the speeches' median row is
25 tokens, a padded batch of 2 about 90). Reported per K: median step time over ``steps`` timed
steps (after 3 warm-up steps), tokens/s of the pack, its ratio to K = 1 on the pack path, and the
peak memory; and the same for Unsloth's own path at K = 1.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import unsloth  # noqa: F401  (first: it patches transformers and peft)
import torch

from harness.worker.multilora import AdapterBank, Segment
from harness.worker.pack import _lora_weights, _plain_forwards
from harness.worker.warm import BaseKey, WarmBase

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def timed(step, steps: int) -> tuple[float, float]:
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), torch.cuda.max_memory_reserved() / 2**20


def main() -> int:
    model_dir, out = sys.argv[1], sys.argv[2]
    args = dict(zip(sys.argv[3::2], sys.argv[4::2]))
    ks = [int(k) for k in args.get("--ks", "1,2,4,8,16,32").split(",")]
    rows, tokens, steps = int(args.get("--rows", 2)), int(args.get("--tokens", 48)), int(args.get("--steps", 8))
    base = WarmBase(BaseKey(model_dir, 256, "bfloat16", False), "cuda")
    results = {"gpu": torch.cuda.get_device_name(), "rows": rows, "tokens": tokens, "steps": steps, "points": []}

    # Unsloth's own path: one trial, PEFT's adapter with Unsloth's fused kernels and checkpointing.
    lent = base.lend(lora_r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS, checkpointing="unsloth",
                     seed=0)
    ids = torch.randint(5, 30000, (rows, tokens), device="cuda")
    opt = torch.optim.AdamW([p for p in lent.parameters() if p.requires_grad], lr=1e-4)

    def unsloth_step():
        lent(input_ids=ids, labels=ids).loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in lent.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    s, peak = timed(unsloth_step, steps)
    results["points"].append({"path": "unsloth", "k": 1, "step_s": s, "tokens_per_s": rows * tokens / s,
                              "peak_mib": peak})
    print(results["points"][-1], flush=True)
    weights = _lora_weights(lent, {n: m for n, m in base.model.named_modules() if n.rsplit(".", 1)[-1] in TARGETS})
    opt = lent = None
    base.give_back()
    _plain_forwards(base.model)
    base.model.enable_input_require_grads()  # checkpointed blocks pass gradients to adapters inside them (PackTrainer does so too)

    # The pack path: K adapters in one bank, one combined forward and backward, one AdamW per slot.
    for k in ks:
        bank = AdapterBank(base.model, TARGETS, k, 16, next(iter(weights.values()))[0].dtype, "cuda")
        for slot in range(k):
            bank.load(slot, weights, 1.0, 0.0)
        bank.install()
        ids = torch.randint(5, 30000, (rows * k, tokens), device="cuda")
        segments = [Segment(i, i * rows, (i + 1) * rows) for i in range(k)]

        def pack_step():
            bank.route(segments, rows * k, tokens)
            logits = base.model(input_ids=ids).logits
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                                                     ids[:, 1:].reshape(-1), reduction="none").view(rows * k, -1)
            torch.stack([loss[s.start:s.end].sum() for s in segments]).sum().backward()
            bank.adamw(list(range(k)), [1e-4] * k, [0.0] * k, [1] * k)  # the pack's AdamW, all slots at once

        try:
            before = {key: t.detach().clone() for key, t in bank.A.items()}
            s, peak = timed(pack_step, steps)
            moved = sum(int(not torch.equal(before[key], t)) for key, t in bank.A.items())
            point = {"path": "pack", "k": k, "step_s": s, "tokens_per_s": rows * tokens * k / s, "peak_mib": peak,
                     "adapted_layers_trained": moved, "adapted_layers": len(bank.A)}
        except torch.OutOfMemoryError as err:
            point = {"path": "pack", "k": k, "oom": str(err)[:200]}
        results["points"].append(point)
        print(point, flush=True)
        bank.remove()
        bank = None
        torch.cuda.empty_cache()
    one = next(p for p in results["points"] if p["path"] == "pack" and p["k"] == 1 and "step_s" in p)
    for p in results["points"]:
        if "tokens_per_s" in p:
            p["vs_pack_1"] = p["tokens_per_s"] / one["tokens_per_s"]
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
