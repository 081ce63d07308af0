"""A worker: the process that trains a driver's trials, over one channel (:mod:`harness.protocol`).

``python -m harness.worker.serve (--connect SOCKET | --listen SOCKET) [--fork] [--max-trials N]``

- ``--connect``: a study's own worker. It connects to the socket its launcher listens on, imports
  the training stack, and serves that study until the driver closes the channel; it dies with
  the driver.
- ``--listen``: a resident worker (``harness warm up``, :mod:`harness.worker.resident`): it
  imports once and serves study after study, whoever connects.

How a trial runs in it:

- **warm** (the default on GPU hosts): in this process, trial after trial, keeping the loaded
  base and what Unsloth compiled (:class:`~harness.worker.warm.WarmBase`); each trial gets a fresh
  adapter, optimizer, data order and peak-memory counters. The worker retires after any
  exception, a full fine-tune, a changed base, a leak or ``--max-trials``
  (:meth:`~harness.worker.trial.WorkerState.after_trial`, the one place that decides it).
- **fork** (``--fork``; CPU hosts): this process only imports; each trial runs in a fresh fork of
  it, from clean memory, so a crash or a leak ends that trial alone and its peak RSS is its own.
  (A process that has initialised CUDA cannot fork.)

Under torchrun (``WORLD_SIZE`` > 1) every rank runs this loop as one **warm group**: rank 0 talks
to the driver and shares each message with the others (:class:`~harness.worker.distributed.Group`);
every rank trains; the group retires as one.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib
import os
import signal
import sys
import time
import traceback
from pathlib import Path

os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from harness import env  # noqa: E402
from harness.protocol import Channel, Closed, connect  # noqa: E402
from harness.worker.trial import DriverGone, Link, TrialSpec, WorkerState, run_trial  # noqa: E402

# Kept from a resident worker's own environment whatever a study sends: the GPU it was started on
# (CUDA is initialised already) and its cache (compiled kernels, models, its socket's folder).
OWN_ENV = ("CUDA_VISIBLE_DEVICES", env.CACHE)


def import_training_stack() -> None:
    """Everything a trial imports (unsloth first), then ``gc.freeze()``.

    Unsloth runs about 15 full garbage collections while loading a model; with the ~700,000
    objects its import leaves behind, they took 5-7 s of a 7B load (``bench/RESULTS.md``). Frozen,
    those objects are no longer traversed.
    """
    import unsloth  # noqa: F401  (first: it patches transformers, trl and peft)

    from harness.worker import loop  # noqa: F401
    from harness.data import prepare  # noqa: F401

    # What a trial's first model load and adapter import otherwise, in every fork (measured: 1.2 of
    # a 1.9 s load of the tests' tiny model on two cores): PEFT's bitsandbytes layer (bitsandbytes
    # compiles its ops on import), the Mistral tokenizer's library, the presets' model classes.
    for name in ("peft.tuners.lora.bnb", "peft.utils.transformers_weight_conversion",
                 "transformers.integrations.mistral.tokenizer", "transformers.models.mistral.modeling_mistral"):
        try:
            importlib.import_module(name)
        except ImportError:  # an optional part this install lacks: the trial imports what it needs
            pass
    gc.freeze()


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when the thread that started it ends (a fork worker's
    child, a rank under its torchrun agent, a resident worker under its supervisor)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL
    except (OSError, AttributeError):
        pass


@contextlib.contextmanager
def output_to(log: str):
    """File descriptors 1 and 2 point to ``log`` meanwhile (a trial's own log)."""
    sys.stdout.flush()
    sys.stderr.flush()
    own_out, own_err = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    try:
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(own_out, 1)
        os.dup2(own_err, 2)
        os.close(own_out)
        os.close(own_err)


def serve_study(channel: Channel | None, worker: WorkerState, fork: bool, group=None, first: dict | None = None) -> bool:
    """Serve one study's messages (``first`` already read) until the driver closes the channel or
    this worker retires. ``channel`` is None on a group's other ranks. True when a warm group broke
    (the caller must exit at once: tearing down a group a dead rank belongs to can block)."""
    lead = group is None or group.lead
    own_env = dict(os.environ)
    import torch

    own_threads = torch.get_num_threads()
    study_dir: Path | None = None
    try:
        while worker.retire is None:
            message = first
            first = None
            if message is None and lead:
                try:
                    message = channel.recv()
                except Closed:
                    message = None
            if group is not None:
                message = group.share(message)
            if message is None:
                return False  # closed: the study needs no more trials
            kind = message["kind"]
            if kind == "study":
                study_dir = Path(message["study_dir"])
                if worker.resident:  # a study's own worker was started with its environment already
                    os.environ.clear()
                    os.environ.update({**message.get("env", {}), **{k: v for k, v in own_env.items() if k in OWN_ENV}})
                if worker.base is not None:
                    worker.base.val_loss_start = None  # another study may validate on other rows
                if lead:
                    channel.send("ready", pid=os.getpid(), resident=worker.resident, fork=fork)
            elif kind == "preload" and not fork:
                _preload(worker, study_dir)
            elif kind == "trial" and not fork and group is None and _concurrent(study_dir) > 1:
                # Concurrent trials: a pack takes this study's trials from here on, until it closes.
                from harness.worker.pack import PackTrainer

                pack = PackTrainer(worker, study_dir, _concurrent(study_dir), channel)
                try:
                    pack.serve(message)
                except Closed:
                    return False
                finally:
                    pack.close()
            elif kind == "trial":
                spec = TrialSpec(study_dir, int(message["number"]), message["params"], float(message["started_at"]),
                                 message["log"])
                if fork:
                    code = _forked(channel, spec, worker.resident)
                else:
                    code, broken = _here(channel, spec, worker, group)
                    if broken:
                        return True
                if lead:
                    channel.send("done", number=spec.number, code=code, retire=worker.retire)
        return False
    finally:
        os.environ.clear()
        os.environ.update(own_env)
        torch.set_num_threads(own_threads)  # a study may have set its share (OMP_NUM_THREADS)


def _concurrent(study_dir: Path) -> int:
    from harness.sweep.config import SweepConfig

    return SweepConfig.model_validate_json((study_dir / "sweep.json").read_text()).concurrent_trials


def _here(channel: Channel | None, spec: TrialSpec, worker: WorkerState, group) -> tuple[int, bool]:
    """Run a trial in this process (warm); (exit code, whether the group broke)."""
    lead = group is None or group.lead
    link = Link(channel if lead else None, spec.number)
    broken = False
    with output_to(spec.log), _ends_with_driver(channel if lead and worker.resident else None):
        print(f"[harness] trial {spec.number}: worker {os.getpid()} on {os.uname().nodename}", flush=True)
        link.send("started", pid=os.getpid())
        report = run_trial(spec, link, worker, lead)
        worker.after_trial(report, full=spec.params.get("method") == "full")
        if group is not None:
            try:
                worker.retire = group.agree(worker.retire, failed=report.failure is not None)
            except Exception as err:  # noqa: BLE001 - whatever broke, the group cannot go on
                traceback.print_exc()
                worker.retire, broken = f"the group broke after trial {spec.number}: {err}", True
        if worker.retire:
            print(f"[harness] this worker takes no more trials: {worker.retire}", flush=True)
        link.send("report", report=report.to_dict())
    return (0 if report.failure is None else 1), broken


@contextlib.contextmanager
def _ends_with_driver(channel: Channel | None):
    """A resident worker's trial must not outlive its study's driver, even while it sends nothing
    (a long step, a hang): once the channel closes, this process ends (its supervisor starts
    another). A study's own worker needs none of this: it dies with its driver."""
    if channel is None:
        yield
        return
    import threading

    done = threading.Event()

    def watch() -> None:
        while not done.wait(0.5):
            if channel.peer_gone() and not done.is_set():
                os._exit(3)

    thread = threading.Thread(target=watch, name="driver-watch", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()


def _forked(channel: Channel, spec: TrialSpec, resident: bool) -> int:
    """Run a trial in a fresh fork of this process (fork); its exit code, negative for a signal.
    The child speaks on the inherited channel; this process only waits for it, and kills it if the
    driver goes away meanwhile."""
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the trial's process
        code = 1
        try:
            die_with_parent()
            with output_to(spec.log):
                print(f"[harness] trial {spec.number}: process {os.getpid()} forked from worker {os.getppid()}",
                      flush=True)
                link = Link(Channel(channel.sock), spec.number)  # a buffer of its own: nothing is pending for it
                link.send("started", pid=os.getpid())
                report = run_trial(spec, link, None, resident=resident)
                link.send("report", report=report.to_dict())
                code = 0 if report.failure is None else 1
        except DriverGone:
            code = 3
        except BaseException:  # noqa: BLE001 - a child never returns into the worker's loop
            traceback.print_exc()
        finally:
            os._exit(code)
    pidfd = os.pidfd_open(pid)
    try:
        import select

        while True:
            ready, _, _ = select.select([pidfd], [], [], 0.5)
            if ready:
                break
            if channel.peer_gone():  # the driver is gone: its trial has no one to report to
                os.kill(pid, signal.SIGKILL)
    finally:
        os.close(pidfd)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def _preload(worker: WorkerState, study_dir: Path | None) -> None:
    """Load the study's base before the first trial comes (the driver says when the model is
    prepared), so that trial starts at its adapter. Any failure leaves the load to the trial."""
    if study_dir is None:
        return
    try:
        from harness.data.prepare import Prepared
        from harness.sweep.config import SweepConfig
        from harness.worker import loop as T
        from harness.worker.warm import BaseKey, WarmBase

        cfg = SweepConfig.model_validate_json((study_dir / "sweep.json").read_text())
        if cfg.search_space.fixed().get("method") == "full":
            return  # a full fine-tune loads its own model
        prepared = Prepared.load(study_dir / "prepared.json")
        device = T.resolve_device(cfg.device)
        dtype = T.resolve_dtype(cfg.model.dtype, device)
        key = BaseKey(prepared.model_dir, cfg.max_seq_length, str(dtype).removeprefix("torch."),
                      bool(cfg.model.load_in_4bit))
        if worker.base is not None:
            if worker.base.key == key:
                return
            worker.drop_base(device)  # a resident worker's earlier study loaded another base
        t0 = time.perf_counter()
        worker.base = WarmBase(key, device)
        print(f"[harness] base preloaded in {time.perf_counter() - t0:.1f}s", flush=True)
    except Exception:  # noqa: BLE001 - the first trial loads it instead, and reports what fails
        traceback.print_exc()
        worker.base = None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m harness.worker.serve")
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--connect", help="a study's own worker: its launcher's socket")
    where.add_argument("--listen", help="a resident worker: the socket to serve studies on")
    parser.add_argument("--fork", action="store_true", help="run each trial in a fresh fork (CPU hosts)")
    parser.add_argument("--max-trials", type=int, default=50)
    parser.add_argument("--device", default="auto", help="a warm group's device: auto | cpu | cuda (the study's)")
    args = parser.parse_args(argv)
    in_group = int(os.environ.get("WORLD_SIZE", "1")) > 1
    lead = int(os.environ.get("RANK", "0")) == 0
    if in_group or args.listen:
        die_with_parent()  # its torchrun agent, or its supervisor (`harness warm up`)
    else:
        # Not by a parent-death signal: that follows the driver's *thread* that started it (a
        # slot's, which ends when its slot runs out of trials while the driver still has the
        # worker to close cleanly).
        from harness.worker.group import die_with_driver

        die_with_driver()
    # Connect first, import after: the driver knows at once that its worker is there.
    channel = connect(args.connect, timeout=60) if args.connect and lead else None
    t0 = time.perf_counter()
    import_training_stack()
    worker = WorkerState(args.max_trials, resident=bool(args.listen), preimport_s=time.perf_counter() - t0)
    if args.listen:
        from harness.worker.resident import serve_resident

        return serve_resident(Path(args.listen), worker, args.fork)
    group = None
    if in_group:
        from harness.worker.distributed import Group
        from harness.worker.loop import resolve_device

        group = Group(resolve_device(args.device))
    try:
        broken = serve_study(channel, worker, args.fork, group)
    except DriverGone:
        return 3
    if broken:
        os._exit(1)
    if group is not None:
        group.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
