"""The 7B load with and without ``gc.freeze()`` after the imports, each in a fresh process.

    python bench/load_gc_freeze.py MODEL_DIR freeze|nofreeze

Prints one JSON line: seconds for from_pretrained and get_peft_model, and how many full garbage
collections ran during them and how long they took (from ``gc.callbacks``).
"""

import gc
import json
import sys
import time

import unsloth  # noqa: F401
from unsloth import FastLanguageModel

import torch

model_dir, mode = sys.argv[1], sys.argv[2]
objects = len(gc.get_objects())
if mode == "freeze":
    gc.freeze()
collections = {"n": 0, "s": 0.0, "t": 0.0}


def on_gc(phase, info):
    if info["generation"] != 2:
        return
    if phase == "start":
        collections["t"] = time.perf_counter()
    else:
        collections["n"] += 1
        collections["s"] += time.perf_counter() - collections["t"]


gc.callbacks.append(on_gc)
t0 = time.perf_counter()
model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=2048, dtype=torch.bfloat16, load_in_4bit=False)
t1 = time.perf_counter()
model = FastLanguageModel.get_peft_model(
    model, r=16, lora_alpha=16, lora_dropout=0, bias="none", random_state=0, use_gradient_checkpointing="unsloth",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
t2 = time.perf_counter()
print(json.dumps({"mode": mode, "objects_after_import": objects, "from_pretrained_s": round(t1 - t0, 2),
                  "get_peft_model_s": round(t2 - t1, 2), "load_s": round(t2 - t0, 2),
                  "full_collections": collections["n"], "full_collection_s": round(collections["s"], 2),
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}))
