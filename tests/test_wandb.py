"""W&B without a network: the once-per-study mode check, and the background start of each trial's
run in the driver. Real W&B SDK, real sockets."""

from __future__ import annotations

import http.server
import os
import socket
import struct
import sys
import threading
import time
from pathlib import Path

import pytest

from conftest import wait_for
from harness.sweep.config import WandbConfig
from harness.sweep.trackers import WandbTracker
from harness.sweep.wandb_check import study_wandb_mode, trial_mode

FAKE_KEY = "0123456789abcdef0123456789abcdef01234567"  # the shape of a W&B key; no server knows it


@pytest.fixture(autouse=True)
def _stop_wandb_service():
    """Each test ends this process's W&B service: it exports WANDB_SERVICE, which would otherwise
    make later child processes (trials of other tests) log through it."""
    yield
    if "wandb" in sys.modules:
        sys.modules["wandb"].teardown()
    os.environ.pop("WANDB_SERVICE", None)


@pytest.fixture
def wandb_env(monkeypatch, tmp_path):
    """No WANDB_MODE (conftest sets offline), no user W&B settings, no netrc: only what a test sets."""
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_BASE_URL", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    return monkeypatch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def silent_server():
    """A loopback port that accepts connections (the kernel's backlog) and never answers."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield s.getsockname()[1]


# --- study_wandb_mode -------------------------------------------------------------------------


def _check_offline_fallback(run_dir: Path, **kwargs) -> None:
    t0 = time.monotonic()
    mode, warning = study_wandb_mode(WandbConfig(), run_dir, **kwargs)
    assert time.monotonic() - t0 < 15
    assert mode == "offline"
    assert "wandb sync" in warning and str(run_dir / "wandb") in warning
    assert FAKE_KEY not in warning


def test_key_but_nothing_listening_goes_offline(wandb_env, tmp_path):
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    _check_offline_fallback(tmp_path / "wandb")


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_key_but_server_never_answers_goes_offline(wandb_env, tmp_path, silent_server, scheme):
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    wandb_env.setenv("WANDB_BASE_URL", f"{scheme}://127.0.0.1:{silent_server}")
    _check_offline_fallback(tmp_path / "wandb", timeout_s=2.0)


def test_server_that_answers_stays_online(wandb_env, tmp_path):
    """Any HTTP answer, an error status included, means the network reaches the server."""

    class Unauthorized(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802
            self.send_response(401)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Unauthorized)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
        wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{server.server_port}")
        assert study_wandb_mode(WandbConfig(), tmp_path / "wandb") == ("online", None)
    finally:
        server.shutdown()


@pytest.mark.parametrize("env_mode", ["disabled", "offline"])
def test_wandb_mode_in_the_environment_wins_without_a_probe(wandb_env, tmp_path, env_mode):
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    wandb_env.setenv("WANDB_MODE", env_mode)
    assert study_wandb_mode(WandbConfig(mode="online"), tmp_path / "wandb") == (env_mode, None)


def test_auto_without_credentials_is_offline_without_a_warning(wandb_env, tmp_path):
    assert study_wandb_mode(WandbConfig(), tmp_path / "wandb") == ("offline", None)


def test_trial_keeps_the_study_decision(wandb_env):
    """The environment may lower the study's mode, never raise it back to online."""
    wandb_env.setenv("WANDB_MODE", "online")
    assert trial_mode(WandbConfig(mode="offline")) == "offline"
    wandb_env.setenv("WANDB_MODE", "disabled")
    assert trial_mode(WandbConfig(mode="online")) == "disabled"
    wandb_env.setenv("WANDB_MODE", "offline")
    assert trial_mode(WandbConfig(mode="auto")) == "offline"


# --- WandbTracker -----------------------------------------------------------------------------


def read_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte header, then a LevelDB-style log (32 KiB blocks of
    chunks: crc32c, length, type) of protobuf ``Record`` messages."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, buf, records = 32 * 1024, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a chunk header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL, LAST
            record = pb.Record()
            record.ParseFromString(buf)
            records.append(record)
            buf = b""
    return records


def offline_runs(run_dir: Path) -> list[Path]:
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def test_tracker_starts_the_run_on_another_thread_and_writes_it(wandb_env, tmp_path, monkeypatch):
    import wandb

    real_init, gate, init_threads = wandb.init, threading.Event(), []

    def held_init(*args, **kwargs):  # the real wandb.init, once the test lets it go
        init_threads.append(threading.current_thread())
        assert gate.wait(60)
        return real_init(*args, **kwargs)

    monkeypatch.setattr(wandb, "init", held_init)
    run_dir = tmp_path / "wandb"
    tracker = WandbTracker(WandbConfig(project="p", mode="offline"), "study", 3, {"learning_rate": 0.01}, run_dir)
    with tracker:
        # __enter__ returned although wandb.init cannot have: it is blocked on the gate.
        deadline = time.monotonic() + 30
        while not init_threads and time.monotonic() < deadline:
            time.sleep(0.01)
        assert init_threads and init_threads[0] is not threading.current_thread()
        assert tracker.run is None and not offline_runs(run_dir)
        gate.set()
        tracker.log({"val_loss": 1.25}, step=1)  # waits for the run
        assert tracker.run is not None
        tracker.summarize({"val_loss": 1.25, "outcome": "complete", "oom_error": None})

    [path] = offline_runs(run_dir)
    # W&B's service process writes the file; on a busy machine its last records land a moment
    # after finish() returns.
    assert wait_for(lambda: any(r.WhichOneof("record_type") == "run" for r in read_records(path)), timeout=60)
    records = read_records(path)
    kinds = [r.WhichOneof("record_type") for r in records]
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    assert run.display_name == "study-trial-3" and run.run_group == "study" and run.project == "p"
    assert {u.key for u in run.config.update} >= {"learning_rate"}
    history = [{(i.key or "/".join(i.nested_key)): i.value_json for i in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    assert any(h.get("val_loss") == "1.25" and h.get("_step") == "1" for h in history), history
    summary = {(u.key or "/".join(u.nested_key)): u.value_json
               for r in records if r.WhichOneof("record_type") == "summary" for u in r.summary.update}
    assert summary.get("outcome") == '"complete"' and "oom_error" not in summary
    assert kinds[-1] == "exit" and records[-1].exit.exit_code == 0


def test_study_fallback_holds_for_each_trial(wandb_env, tmp_path):
    """The study fell back to offline; WANDB_MODE=online and a key in the environment: each trial's
    run is still offline, at once."""
    wandb_env.setenv("WANDB_MODE", "online")
    wandb_env.setenv("WANDB_API_KEY", FAKE_KEY)
    wandb_env.setenv("WANDB_BASE_URL", f"http://127.0.0.1:{free_port()}")
    run_dir = tmp_path / "wandb"
    with WandbTracker(WandbConfig(mode="offline"), "study", 0, {}, run_dir) as tracker:
        tracker.log({"val_loss": 2.0}, step=1)
        assert tracker.run is not None
    assert len(offline_runs(run_dir)) == 1


def test_a_failing_wandb_call_turns_the_tracker_off(wandb_env, tmp_path, capsys):
    """The fault hook (harness.faults 'wandb') still acts on the next call after a background init."""
    run_dir = tmp_path / "wandb"
    with WandbTracker(WandbConfig(mode="offline"), "study", 1, {}, run_dir) as tracker:
        tracker.fail_next(OSError(28, "No space left on device"))
        tracker.log({"val_loss": 2.0}, step=1)
        assert tracker.run is None
        tracker.summarize({"val_loss": 2.0})  # off: nothing happens, nothing raises
    assert ("W&B log for trial 1 failed, continuing without it: OSError: [Errno 28] No space left on device"
            in capsys.readouterr().err)


def test_a_failing_init_never_fails_the_trial(wandb_env, tmp_path, capsys):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")  # the run folder cannot be made under a file
    with WandbTracker(WandbConfig(mode="offline"), "study", 1, {}, blocker / "wandb") as tracker:
        tracker.log({"val_loss": 2.0}, step=1)
        tracker.summarize({"val_loss": 2.0})
    assert tracker.run is None
    assert capsys.readouterr().err.count("W&B init for trial 1 failed") == 1


def test_disabled_starts_nothing(wandb_env, tmp_path):
    with WandbTracker(WandbConfig(mode="disabled"), "study", 1, {}, tmp_path / "wandb") as tracker:
        tracker.log({"val_loss": 2.0}, step=1)
    assert tracker.run is None and not (tmp_path / "wandb").exists()
