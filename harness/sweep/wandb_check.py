"""W&B decisions the driver takes once per study, and the clean-up after a killed trial.

* :func:`study_wandb_mode`: which mode every trial of the study uses. When the mode comes out
  ``online`` but the W&B server does not answer (a cluster node without internet, with a key in
  its environment), the study falls back to ``offline`` with one warning, instead of every trial
  waiting a minute for ``wandb.init`` to time out.
* :func:`remove_empty_runs`: a trial killed while W&B was starting leaves a run file with no
  record in it; this removes such files (and their run folders) so ``wandb sync`` sees only runs.

This module is part of the torch-free driver and never imports wandb: the mode is decided from the
environment, a netrc file and one HTTP request.
"""

from __future__ import annotations

import configparser
import netrc
import os
import shlex
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from harness.sweep.config import WandbConfig

DEFAULT_BASE_URL = "https://api.wandb.ai"
MODES = ("online", "offline", "disabled")  # most to least online

# A .wandb file starts with a 7-byte header (":W&B", a magic number, a version); the records follow.
# W&B buffers records (flushed in blocks and at the end), so a killed run may leave the header alone
# or nothing at all.
_HEADER_BYTES = 7


def base_url() -> str:
    """The W&B server as wandb finds it: ``WANDB_BASE_URL``, else the one ``wandb login --host``
    saved in W&B's settings file, else the public cloud."""
    if url := os.environ.get("WANDB_BASE_URL"):
        return url.rstrip("/")
    config_dir = Path(os.environ.get("WANDB_CONFIG_DIR") or Path.home() / ".config" / "wandb")
    parser = configparser.ConfigParser()
    try:
        parser.read(config_dir / "settings")
        url = parser.get("default", "base_url", fallback="")
    except (configparser.Error, OSError, UnicodeDecodeError):
        url = ""
    return (url or DEFAULT_BASE_URL).rstrip("/")


def _host(url: str) -> str:
    """``https://api.wandb.ai/`` → ``api.wandb.ai`` (the netrc machine name W&B uses)."""
    return url.split("://")[-1].split("/")[0]


def _has_credentials() -> bool:
    """An API key in the environment, or a netrc entry for the W&B host (what ``wandb login`` writes).
    The key itself is only tested for presence: never read into a message, never stored."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return bool(netrc.netrc(os.environ.get("NETRC")).authenticators(_host(base_url())))
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(cfg: WandbConfig) -> str:
    """The configured mode, without asking the network: ``WANDB_MODE`` in the environment wins;
    ``auto`` is online only when the user has W&B credentials (``WANDB_API_KEY`` or a netrc entry)."""
    if os.environ.get("WANDB_MODE") in MODES:
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if _has_credentials() else "offline"



def trial_mode(cfg: WandbConfig) -> str:
    """The mode a trial's tracker uses.

    The driver writes the study's decision (:func:`study_wandb_mode`) into ``cfg.mode``; it already
    took ``WANDB_MODE`` into account. The environment may still lower it (offline, disabled) but
    not raise it: a study that fell back to offline stays offline although the trial inherits
    ``WANDB_MODE=online``. A config the driver did not resolve (``auto``) goes by :func:`wandb_mode`.
    """
    if cfg.mode == "auto":
        return wandb_mode(cfg)
    env = os.environ.get("WANDB_MODE")
    return max(cfg.mode, env, key=MODES.index) if env in MODES else cfg.mode

def _probe(url: str, timeout_s: float) -> str | None:
    """None when the server at ``url`` answers an HTTP request within ``timeout_s``, else why not.

    Any HTTP status counts as an answer: the question is whether the network reaches W&B, not
    whether the key is good (no key is sent). The request runs on a daemon thread joined with the
    timeout, because the socket timeout does not cover a DNS lookup, which can hang far longer.
    """
    outcome: list[str | None] = []

    def request() -> None:
        try:
            # Proxies come from the environment (HTTPS_PROXY, NO_PROXY), as they do for wandb.
            with urllib.request.urlopen(urllib.request.Request(url, method="GET"), timeout=timeout_s):
                outcome.append(None)
        except urllib.error.HTTPError as err:
            err.close()
            outcome.append(None)  # an error status is still an answer
        except urllib.error.URLError as err:
            if isinstance(err.reason, ssl.SSLCertVerificationError):
                outcome.append(None)  # it spoke TLS; certificates are wandb's business
            else:
                outcome.append(f"{type(err.reason).__name__}: {err.reason}")
        except Exception as err:  # noqa: BLE001 - a timeout, a reset connection, a garbled reply
            outcome.append(f"{type(err).__name__}: {err}" if str(err) else type(err).__name__)

    thread = threading.Thread(target=request, name="wandb-probe", daemon=True)
    thread.start()
    thread.join(timeout_s)
    return outcome[0] if outcome else f"no answer within {timeout_s:g} s"


def study_wandb_mode(cfg: WandbConfig, run_dir: Path, timeout_s: float = 5.0) -> tuple[str, str | None]:
    """The W&B mode every trial of a study uses, and a warning line for the user (or None).

    ``run_dir`` is the folder the trials give ``WandbTracker`` (W&B writes its runs under
    ``run_dir/wandb``); the warning names it for ``wandb sync``. Decided once per study, by the
    driver: if the mode is ``online`` and the server does not answer within ``timeout_s``, the
    whole study goes ``offline`` rather than each trial waiting for ``wandb.init`` to time out.
    """
    mode = wandb_mode(cfg)
    if mode != "online":
        return mode, None
    url = base_url()
    why = _probe(url, timeout_s)
    if why is None:
        return "online", None
    sync_dir = shlex.quote(str(Path(run_dir) / "wandb"))
    return "offline", (f"warning: the W&B server {_host(url)} is not reachable ({why}); this study's W&B runs "
                       f"are written offline. Upload them later with: wandb sync {sync_dir}")


def _held_open(paths: set[Path]) -> set[Path]:
    """Those of ``paths`` that a running process has open: a live run (another trial's, in a
    parallel slot) whose records W&B has not flushed yet looks empty too, and must be kept."""
    import psutil  # only needed here: after a killed trial

    held: set[Path] = set()
    for proc in psutil.process_iter(["open_files"]):
        for f in proc.info.get("open_files") or ():  # None where access is denied
            path = Path(f.path)
            if path in paths:
                held.add(path)
    return held


def remove_empty_runs(wandb_dir: Path, grace_s: float = 2.0) -> int:
    """Remove the W&B run files under ``wandb_dir`` that hold no record; return how many.

    Call it after killing a trial (Ctrl-C, a hang): a trial killed before W&B flushed anything
    leaves a ``.wandb`` file of 0 bytes or of the 7-byte header alone: nothing ``wandb sync`` could
    upload. A run folder (``offline-run-*``, ``run-*``) left with no run file is removed with it.
    Files some process still has open are kept: the killed trial's W&B service exits within a
    moment (waited for up to ``grace_s``), while a parallel trial's live run keeps its file open.
    """
    wandb_dir = Path(wandb_dir)
    empty: set[Path] = set()
    # os.walk does not follow symlinks: W&B's "latest-run" link would list a run twice.
    for root, _dirs, files in os.walk(wandb_dir):
        for name in files:
            path = Path(root, name)
            if not name.endswith(".wandb") or path.is_symlink():
                continue
            try:
                if path.stat().st_size <= _HEADER_BYTES:
                    empty.add(path.resolve())  # resolved: compared with the paths processes hold open
            except OSError:
                pass  # removed meanwhile
    if not empty:
        return 0
    deadline = time.monotonic() + grace_s
    while (held := _held_open(empty)) and time.monotonic() < deadline:
        time.sleep(0.1)
    removed, parents = 0, set()
    for path in sorted(empty - held):
        try:
            if path.stat().st_size > _HEADER_BYTES:
                continue  # records arrived meanwhile: a live run after all
            path.unlink()
        except OSError:
            continue
        removed += 1
        run = path.parent
        if run.name.startswith(("offline-run-", "run-")) and not any(run.glob("*.wandb")):
            shutil.rmtree(run, ignore_errors=True)
            parents.add(run.parent)
    # W&B's links to the latest run ("latest-run", "debug.log", ...) may now point at a removed folder.
    for link in (p for parent in parents for p in parent.iterdir()):
        if link.is_symlink() and not link.exists():
            link.unlink(missing_ok=True)
    return removed
