"""The W&B decision the driver takes once per study.

* :func:`study_wandb_mode`: which mode every trial of the study uses. When the mode comes out
  ``online`` but the W&B server does not answer (a cluster node without internet, with a key in
  its environment), the study falls back to ``offline`` with one warning, instead of every trial
  waiting a minute for ``wandb.init`` to time out.

This module is part of the torch-free driver and never imports wandb: the mode is decided from the
environment, a netrc file and one HTTP request.
"""

from __future__ import annotations

import configparser
import netrc
import os
import shlex
import ssl
import threading
import urllib.error
import urllib.request
from pathlib import Path

from harness.sweep.config import WandbConfig

DEFAULT_BASE_URL = "https://api.wandb.ai"
MODES = ("online", "offline", "disabled")  # most to least online


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
