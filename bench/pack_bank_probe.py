"""Issue 24's probe of the pack path itself, with no Unsloth and no wheelhouse: the harness's
batched adapters (harness/worker/multilora.py: AdapterBank, its batched AdamW) on a random-init
Mistral-7B-shaped base in bf16 with gradient checkpointing, one optimizer step of K LoRA trials
together, against one trial on PEFT's own LoRA path (the plain transformers + PEFT path, not
Unsloth's fused kernels), same rows, same card, one process:

    python3 bench/pack_bank_probe.py OUT.json [--shape 7b|tiny] [--ks 1,2,4,8,16,32]

Two regimes, as the issue asks:
- host-bound: each trial's micro-batch 2 rows x 48 tokens (the speeches at batch 2);
- compute-bound: each trial's micro-batch 4 rows x 2,048 tokens, K = 1 and 2.

Per point: the median step time over ``steps`` timed steps (after 2 warm-up steps), tokens/s of
the pack, the speed-up over K trials one at a time on the same path (K x the K = 1 step time over
the pack's), and the peak memory reserved. A best case in one way: every trial has the same rank
and rows (equal segments); ranks differing only pad ``A``/``B`` to the largest.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from harness.worker.multilora import AdapterBank, Segment

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SHAPES = {
    "7b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=32768, max_position_embeddings=4096),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, max_position_embeddings=256),
}


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(step, steps: int) -> tuple[float, float]:
    for _ in range(2):
        step()
    sync()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(steps):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_available() else 0.0
    return statistics.median(times), peak


def main() -> int:
    out = sys.argv[1]
    args = dict(zip(sys.argv[2::2], sys.argv[3::2]))
    shape = args.get("--shape", "7b")
    ks = [int(k) for k in args.get("--ks", "1,2,4,8,16,32").split(",")]
    steps = int(args.get("--steps", 6))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    from transformers import MistralConfig, MistralForCausalLM

    torch.manual_seed(0)
    config = MistralConfig(**SHAPES[shape], torch_dtype="bfloat16")
    t0 = time.perf_counter()
    with torch.device(device):
        model = MistralForCausalLM(config).to(torch.bfloat16)
    model.requires_grad_(False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.config.use_cache = False
    model.train()
    vocab = config.vocab_size
    results = {"gpu": torch.cuda.get_device_name() if device == "cuda" else "cpu", "shape": shape,
               "torch": torch.__version__, "steps": steps, "build_s": round(time.perf_counter() - t0, 1),
               "points": []}
    print(f"base built in {results['build_s']} s on {results['gpu']}", flush=True)

    def peft_point(rows: int, tokens: int) -> dict:
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0, target_modules=TARGETS))
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4, fused=device == "cuda")
        ids = torch.randint(5, vocab, (rows, tokens), device=device)

        def step():
            peft_model(input_ids=ids, labels=ids).loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)

        s, peak = timed(step, steps)
        peft_model.unload()  # the base's own layers back, for the bank
        return {"path": "peft", "k": 1, "rows": rows, "tokens": tokens, "step_s": round(s, 4),
                "tokens_per_s": round(rows * tokens / s, 1), "peak_mib": round(peak)}

    def bank_point(k: int, rows: int, tokens: int) -> dict:
        bank = AdapterBank(model, TARGETS, k, 16, torch.bfloat16, device)
        with torch.no_grad():
            for t in bank.A.values():
                t.normal_(0, 0.02)
            for t in bank.B.values():
                t.normal_(0, 0.02)
            bank.scale.fill_(1.0)
        bank.install()
        ids = torch.randint(5, vocab, (k * rows, tokens), device=device)
        bank.route([Segment(i, i * rows, (i + 1) * rows) for i in range(k)], k * rows, tokens)
        slots, counter = list(range(k)), [0]

        def step():
            model(input_ids=ids, labels=ids).loss.backward()
            counter[0] += 1
            bank.adamw(slots, [1e-4] * k, [0.0] * k, [counter[0]] * k)

        try:
            s, peak = timed(step, steps)
        finally:
            bank.remove()
        del bank
        if device == "cuda":
            torch.cuda.empty_cache()
        return {"path": "bank", "k": k, "rows": rows, "tokens": tokens, "step_s": round(s, 4),
                "tokens_per_s": round(k * rows * tokens / s, 1), "peak_mib": round(peak)}

    regimes = [("host-bound", 2, 48, ks), ("compute-bound", 4, 2048 if shape == "7b" else 128, [1, 2])]
    for name, rows, tokens, kset in regimes:
        base_peft = peft_point(rows, tokens)
        base_peft["regime"] = name
        results["points"].append(base_peft)
        print(json.dumps(base_peft), flush=True)
        one = None
        for k in kset:
            try:
                point = bank_point(k, rows, tokens)
            except torch.OutOfMemoryError as err:
                point = {"path": "bank", "k": k, "rows": rows, "tokens": tokens, "error": f"OOM: {err}"[:200]}
            point["regime"] = name
            if "step_s" in point:
                one = one or point["step_s"]
                point["speedup_vs_one_at_a_time"] = round(k * one / point["step_s"], 2)
                point["vs_peft_one_at_a_time"] = round(k * base_peft["step_s"] / point["step_s"], 2)
            results["points"].append(point)
            print(json.dumps(point), flush=True)
            with open(out, "w") as f:
                json.dump(results, f, indent=1)
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
