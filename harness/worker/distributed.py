"""A trial spread over several processes (``gpus_per_trial`` > 1, started by torchrun), and the
control channel of a warm group of them (:class:`Group`)."""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from datetime import timedelta

import torch


@dataclass
class Dist:
    """This process's place in a multi-process trial (``gpus_per_trial`` > 1, started by torchrun).

    Every rank draws the same stream of batches and trains on every ``world``-th one; gradients are
    summed across ranks after each backward pass (one all-reduce of the LoRA gradients, flattened),
    so the step equals one step on ``world`` times the batch. Rank 0 talks to the driver.
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

    def decide(self, decision: str | None) -> str | None:
        """Rank 0's decision at a validation (stop: "pruned", "converged"; or None), for everyone."""
        if self.world == 1:
            return decision
        import torch.distributed as dist

        box = [decision]
        dist.broadcast_object_list(box, src=0)
        return box[0]

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
    """Join the process group torchrun set up (NCCL on GPUs, Gloo on CPU); a no-op alone, and
    once joined (a warm group's later trials)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    import torch.distributed as dist

    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())

    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if device == "cuda" else "gloo")
    return Dist(dist.get_rank(), dist.get_world_size())


# A warm group waits between trials for as long as the driver takes to name the next one (the
# study's preparation, other workers' trials): no deadline that a quiet study would reach.
IDLE_TIMEOUT = timedelta(days=30)
# How long a rank whose trial failed waits for the others to end theirs. A failure on one rank
# can leave the others blocked in a collective it will never join; only its exit frees them
# (torchrun then ends the group). Long enough for rank 0 to send a failed trial's report and
# write its record, which the group's end would otherwise cut short.
FAILED_WAIT = timedelta(seconds=120)


class Group:
    """A warm group's control channel (``harness.worker.serve`` under torchrun): rank 0
    shares what the driver sends (:meth:`share`); after each trial the ranks :meth:`agree`
    whether the group goes on.

    Joins the training process group for good (a warm group's trials all use it), and opens a
    Gloo group of its own beside it for control: it carries Python objects without a GPU, and a
    rank may wait in it for hours between trials, where NCCL's watchdog ends a collective that
    waits 10 minutes.
    """

    def __init__(self, device: str):
        import torch.distributed as dist

        self.dist = init_distributed(device)
        self._control = dist.new_group(backend="gloo", timeout=IDLE_TIMEOUT)

    @property
    def lead(self) -> bool:
        return self.dist.rank == 0

    def share(self, message):
        """Rank 0's ``message``, on every rank."""
        import torch.distributed as dist

        box = [message]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]

    def agree(self, retire: str | None, failed: bool) -> str | None:
        """Once every rank has ended its trial: a reason for the group to retire, if any rank has
        one (one rank's failure retires them all); else None. Raises when the others do not all
        arrive, within :data:`FAILED_WAIT` if this rank's trial ``failed``.

        The exchange runs in a thread that a failed rank stops waiting for: Gloo bounds a wait
        by its group's timeout alone (``monitored_barrier``'s own applies on rank 0 only)."""
        import torch.distributed as dist

        reasons: list = [None] * self.dist.world
        errors: list[BaseException] = []

        def exchange() -> None:
            try:
                dist.all_gather_object(reasons, retire, group=self._control)
            except BaseException as err:  # noqa: BLE001 - re-raised by the caller's thread
                errors.append(err)

        thread = threading.Thread(target=exchange, name="group-agree", daemon=True)
        thread.start()
        thread.join(FAILED_WAIT.total_seconds() if failed else None)
        if thread.is_alive():
            raise TimeoutError(f"the other ranks did not end the trial within {FAILED_WAIT.total_seconds():g} s")
        if errors:
            raise errors[0]
        return next((r for r in reasons if r), None)

    def close(self) -> None:
        import torch.distributed as dist

        dist.destroy_process_group()
