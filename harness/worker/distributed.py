"""A trial spread over several processes (``gpus_per_trial`` > 1, started by torchrun)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass
class Dist:
    """This process's place in a multi-process trial (``gpus_per_trial`` > 1, started by torchrun).

    Every rank draws the same stream of batches and trains on every ``world``-th one; gradients are
    summed across ranks after each backward pass (one all-reduce of the LoRA gradients, flattened),
    so the step equals one step on ``world`` times the batch. Rank 0 talks to Optuna.
    """

    rank: int = 0
    world: int = 1

    def sum(self, *values: float) -> list[float]:
        if self.world == 1:
            return list(values)
        import torch.distributed as dist

        t = torch.tensor(values, dtype=torch.float64, device=_collective_device())
        dist.all_reduce(t)
        return t.tolist()

    def gather(self, value: float) -> list[float]:
        if self.world == 1:
            return [value]
        import torch.distributed as dist

        out = [None] * self.world
        dist.all_gather_object(out, value)
        return out

    def decide(self, flag: bool) -> bool:
        """Rank 0's decision, for everyone (to prune or not)."""
        if self.world == 1:
            return flag
        import torch.distributed as dist

        box = [flag]
        dist.broadcast_object_list(box, src=0)
        return bool(box[0])

    def sum_gradients(self, params: list[torch.Tensor]) -> None:
        if self.world == 1:
            return
        import torch.distributed as dist

        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([g.reshape(-1).float() for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()


def _collective_device() -> str:
    import torch.distributed as dist

    return "cuda" if dist.get_backend() == "nccl" else "cpu"


def init_distributed(device: str) -> Dist:
    """Join the process group torchrun set up (NCCL on GPUs, Gloo on CPU); a no-op alone."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


