"""A base model loaded once, lending a fresh LoRA adapter to each trial: what a warm trial worker
(``harness.launch.warm``) keeps between trials, and what ``bench/predictor_check.py`` measures with.

Loading a 7B base takes 5-9 s and Unsloth compiles each transformer block on the first training
steps of every new LoRA rank in a process (10-18 s); a worker that keeps the base and what was
compiled pays both once. Each trial still starts from nothing of the previous one: a new adapter
(PEFT's init, seeded by the trial's seed, with its rank, alpha, dropout and targets), a new
optimizer and data order (``loop.train``), and peak-memory counters reset. When the trial ends the
adapter is unloaded (``PeftModel.unload``: the original linear layers put back) and the frozen
base is checked against its fingerprint taken at load; a base that changed, or memory that was
not given back, retires the worker (:class:`BaseChanged`, :meth:`WarmBase.leaked_mib`).

Imported only in worker processes (it imports torch; unsloth is imported first by the caller).
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass
from typing import Any

import torch

from harness.worker.backends import gradient_checkpointing
from harness.worker.metrics import MIB, release_cached_memory, reset_peak_memory


class BaseChanged(RuntimeError):
    """The frozen base's weights differ from when it was loaded: the worker must not be reused."""


@dataclass(frozen=True)
class BaseKey:
    """What a loaded base depends on: a trial whose key differs needs another load."""

    model_dir: str
    max_seq_length: int
    dtype: str
    load_in_4bit: bool


def fingerprint(model) -> torch.Tensor:
    """One float64 sum per weight tensor (and its sum of squares), computed where the weight lives:
    cheap on a GPU (a 7B model's 291 tensors in milliseconds) and changed by any update that is not
    a permutation within a tensor."""
    sums = []
    with torch.no_grad():
        for _, t in sorted(model.state_dict().items()):
            if t.is_floating_point():
                # Accumulated in float64 without a float64 copy of the tensor (1 GiB for a 7B embedding).
                sums.append(torch.stack([t.sum(dtype=torch.float64),
                                         torch.linalg.vector_norm(t, dtype=torch.float64)]).cpu())
    return torch.cat(sums) if sums else torch.zeros(0, dtype=torch.float64)


class WarmBase:
    """The base a worker keeps: :meth:`lend` an adapter for a trial, :meth:`give_back` it after."""

    def __init__(self, key: BaseKey, device: str):
        import unsloth  # noqa: F401  (before transformers/peft: it patches them)
        from unsloth import FastLanguageModel

        self.key, self.device = key, device
        self.model, self.tokenizer = FastLanguageModel.from_pretrained(
            model_name=key.model_dir, max_seq_length=key.max_seq_length, dtype=getattr(torch, key.dtype),
            load_in_4bit=key.load_in_4bit,
        )
        self.lent: Any = None
        self.trials = 0
        # The base's validation loss, set by the first trial that lends from it: every later trial's
        # val_loss_start is the same (a fresh adapter is a no-op), so it is not computed again.
        self.val_loss_start: float | None = None
        self._fingerprint = fingerprint(self.model)
        gc.collect()
        release_cached_memory(device)
        self.resident_mib = _allocated_mib(device)  # the base alone: what must remain after give_back

    def lend(self, *, lora_r: int, lora_alpha: int, lora_dropout: float, target_modules: list[str],
             checkpointing: Any, seed: int):
        """A new LoRA adapter on the base, initialised from ``seed`` (``get_peft_model``'s
        ``random_state``); peak-memory counters reset, so the trial's peak is its own."""
        from unsloth import FastLanguageModel

        if self.lent is not None:
            raise RuntimeError("the base already lends an adapter: give it back first")
        t0 = time.perf_counter()
        gc.collect()
        t1 = time.perf_counter()
        release_cached_memory(self.device)
        reset_peak_memory(self.device)
        t2 = time.perf_counter()
        self.lent = FastLanguageModel.get_peft_model(
            self.model, r=lora_r, lora_alpha=lora_alpha, lora_dropout=lora_dropout, target_modules=target_modules,
            bias="none", use_gradient_checkpointing=gradient_checkpointing(checkpointing), random_state=seed,
        )
        # Where a fresh adapter's time goes (the trial's log): it is most of a warm trial's fixed cost.
        print(f"[harness] adapter lent in {time.perf_counter() - t0:.2f}s: collect {t1 - t0:.2f}s, cache freed "
              f"{t2 - t1:.2f}s, get_peft_model {time.perf_counter() - t2:.2f}s "
              f"({torch.get_num_threads()} CPU threads)", flush=True)
        self.trials += 1
        return self.lent

    def give_back(self) -> None:
        """Unload the lent adapter (the base's own layers back in place), free what the trial left,
        and check the base is as loaded; raises :class:`BaseChanged` if not."""
        if self.lent is None:
            return
        lent, self.lent = self.lent, None
        base = lent.unload()  # PEFT: LoRA layers replaced by the original linear layers, no merge
        for attr in ("peft_config", "_hf_peft_config_loaded"):
            if attr in vars(base):
                delattr(base, attr)
        self.model = base
        del lent
        _reset_offload_buffers()
        gc.collect()
        release_cached_memory(self.device)
        if not torch.equal(fingerprint(self.model), self._fingerprint):
            raise BaseChanged("the frozen base's weights changed during a trial")

    def leaked_mib(self) -> float:
        """Memory still allocated beyond the base's own after :meth:`give_back`."""
        return max(0.0, _allocated_mib(self.device) - self.resident_mib)


def _reset_offload_buffers() -> None:
    """Shrink Unsloth's gradient-offloading buffers back to their initial size. With
    ``use_gradient_checkpointing="unsloth"`` they grow to the largest activations a process has
    offloaded and stay: on an H100 a config run again after larger ones peaked 2.3% (7B) and 14%
    (1B) higher, 176-560 MiB left allocated (bench/predictor/). Unsloth's own reset, meant for
    between two trainings in one process."""
    try:
        from unsloth_zoo import gradient_checkpointing as offload
    except ImportError:
        return
    # Only once Unsloth set them up (on a GPU, at its first offloaded checkpoint; never on CPU).
    if getattr(offload, "GPU_BUFFERS", None) is not None and getattr(offload, "CPU_BUFFERS", None) is not None:
        offload.reset_unsloth_gradient_checkpointing_buffers()


def _allocated_mib(device: str) -> float:
    """What tensors hold: CUDA's allocator knows; on CPU, the storages of every live tensor (the
    process's RSS would also count the allocator's free lists, which come and go)."""
    if device == "cuda":
        return torch.cuda.memory_allocated() / MIB
    import warnings

    storages: dict[int, int] = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() wakes deprecated module attributes up
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor) and obj.device.type == "cpu":
                storage = obj.untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / MIB
