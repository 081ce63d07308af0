"""Where a 7B trial's fixed cost goes on a GPU host, and whether a fork server can work there.

    python bench/gpu_load_profile.py MODEL_DIR OUT_DIR

1. ``import unsloth``: timed; is CUDA initialised afterwards (torch's view, and the driver's:
   does this process hold a CUDA context, as nvidia-smi sees it)?
2. Fork after the import: does a forked child get a working CUDA (a matmul), and does it load
   and train the model? That decides between a fork server and pre-spawned standby processes.
3. The 7B load, part by part (from_pretrained, get_peft_model) with a cProfile of each.
"""

import cProfile
import io
import json
import os
import pstats
import subprocess
import sys
import time

model_dir, out = sys.argv[1], sys.argv[2]
report = {}


def gpu_apps():
    q = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader"],
                       capture_output=True, text=True).stdout
    return q.strip()


t = time.perf_counter()
import unsloth  # noqa: E402,F401
from unsloth import FastLanguageModel  # noqa: E402
import torch  # noqa: E402

report["import_unsloth_s"] = round(time.perf_counter() - t, 2)
report["torch_cuda_initialized_after_import"] = torch.cuda.is_initialized()
report["gpu_apps_after_import"] = gpu_apps()
report["my_pid"] = os.getpid()
print(json.dumps(report), flush=True)

# Fork test: a child forked now; does CUDA work in it?
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.close(r)
    res = {}
    try:
        t = time.perf_counter()
        x = torch.randn(1024, 1024, device="cuda")
        res["child_matmul"] = float((x @ x).sum().item()) != 0.0
        res["child_cuda_init_s"] = round(time.perf_counter() - t, 2)
        t = time.perf_counter()
        model, tok = FastLanguageModel.from_pretrained(model_dir, max_seq_length=2048, dtype=torch.bfloat16,
                                                       load_in_4bit=False)
        res["child_from_pretrained_s"] = round(time.perf_counter() - t, 2)
        model = FastLanguageModel.get_peft_model(model, r=16, lora_alpha=16, lora_dropout=0, bias="none",
                                                 target_modules=["q_proj", "k_proj", "v_proj", "o_proj",
                                                                 "gate_proj", "up_proj", "down_proj"],
                                                 use_gradient_checkpointing="unsloth", random_state=0)
        model.train()
        ids = torch.randint(0, 32000, (2, 512), device="cuda")
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        res["child_train_step_loss"] = float(loss)
    except Exception as e:  # noqa: BLE001
        res["child_error"] = f"{type(e).__name__}: {str(e)[:400]}"
    os.write(w, json.dumps(res).encode())
    os._exit(0)
os.close(w)
child = b""
while chunk := os.read(r, 65536):
    child += chunk
os.waitpid(pid, 0)
report["fork"] = json.loads(child or b"{}")
print(json.dumps(report["fork"]), flush=True)


def profiled(fn, name):
    pr = cProfile.Profile()
    t = time.perf_counter()
    pr.enable()
    value = fn()
    pr.disable()
    report[name + "_s"] = round(time.perf_counter() - t, 2)
    s = io.StringIO()
    st = pstats.Stats(pr, stream=s)
    st.sort_stats("cumulative").print_stats(45)
    st.sort_stats("tottime").print_stats(25)
    with open(os.path.join(out, f"profile_{name}.txt"), "w") as f:
        f.write(s.getvalue())
    return value


model, tok = profiled(lambda: FastLanguageModel.from_pretrained(
    model_dir, max_seq_length=2048, dtype=torch.bfloat16, load_in_4bit=False), "from_pretrained")
model = profiled(lambda: FastLanguageModel.get_peft_model(
    model, r=16, lora_alpha=16, lora_dropout=0, bias="none", random_state=0, use_gradient_checkpointing="unsloth",
    target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]), "get_peft_model")
report["gpu_apps_after_load"] = gpu_apps()
report["allocated_gib"] = round(torch.cuda.memory_allocated() / 2**30, 2)
print(json.dumps(report), flush=True)
with open(os.path.join(out, "load_profile.json"), "w") as f:
    json.dump(report, f, indent=1)
