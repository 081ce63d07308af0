"""A standalone Unsloth LoRA loop, the reference a harness trial is measured against.

No harness code: FastLanguageModel.from_pretrained + get_peft_model, AdamW, a fixed batch of
random tokens (B x L, no padding), the median step time after warm-up.

    python bench/standalone_unsloth.py MODEL_DIR [--batch 4] [--seq 2048] [--steps 8] [--warmup 3]
"""

import argparse
import json
import statistics
import time

import unsloth  # noqa: F401
from unsloth import FastLanguageModel

import torch

ap = argparse.ArgumentParser()
ap.add_argument("model_dir")
ap.add_argument("--batch", type=int, default=4)
ap.add_argument("--seq", type=int, default=2048)
ap.add_argument("--rank", type=int, default=16)
ap.add_argument("--steps", type=int, default=8)
ap.add_argument("--warmup", type=int, default=3)
ap.add_argument("--checkpointing", default="unsloth")
args = ap.parse_args()

model, tok = FastLanguageModel.from_pretrained(args.model_dir, max_seq_length=args.seq, dtype=torch.bfloat16,
                                               load_in_4bit=False)
model = FastLanguageModel.get_peft_model(
    model, r=args.rank, lora_alpha=16, lora_dropout=0, bias="none", random_state=0,
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    use_gradient_checkpointing={"true": True, "false": False}.get(args.checkpointing, args.checkpointing),
)
model.train()  # checkpointing (and Unsloth's training paths) act only in training mode
opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
ids = torch.randint(0, model.config.vocab_size, (args.batch, args.seq), generator=torch.Generator().manual_seed(0)).cuda()
torch.cuda.reset_peak_memory_stats()
times = []
for step in range(args.warmup + args.steps):
    torch.cuda.synchronize()
    t = time.perf_counter()
    model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    if step >= args.warmup:
        times.append(time.perf_counter() - t)
step_s = statistics.median(times)
print(json.dumps({"tokens_per_s": args.batch * args.seq / step_s, "step_s": step_s,
                  "peak_reserved_mib": torch.cuda.max_memory_reserved() / 2**20, "gpu": torch.cuda.get_device_name()}))
