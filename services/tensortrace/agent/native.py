"""Which tap path the agent uses: the native fast path (agent/_capture.c) or the Python one.

`_capture` is a CPython C-API extension built by `pip install -e .` (setup.py NATIVE, optional: no
compiler or a failed build leaves it out and the package installs anyway). The Python path in
core.py stays the fallback and the oracle (tests/agent/test_native_capture.py: both write the same
ring bytes). docs/agent.md "Native fast path" has the measurements behind the choice.

    mod, reason = load()        # (the module, "") or (None, why it is not used)
    TENSORTRACE_NATIVE=0        # the environment switch: the Python path even where it is built
"""

from __future__ import annotations

import importlib
import logging
import os

log = logging.getLogger("tensortrace.agent")

ENV = "TENSORTRACE_NATIVE"
ABI = 5   # _capture.ABI this Python code speaks
_logged: set = set()


def load(required: bool = False):
    """(module, "") when the native path is usable, else (None, a one-line reason).

    required: the caller asked for it explicitly (AgentConfig.capture_path="native"): the
    environment switch does not apply and a missing build is the caller's error to raise.
    """
    if not required and os.environ.get(ENV, "").strip().lower() in ("0", "false", "no", "off"):
        return None, f"disabled by {ENV}={os.environ[ENV]}"
    try:
        _capture = importlib.import_module("tensortrace.agent._capture")
    except ImportError as e:
        return None, (f"the native extension tensortrace.agent._capture is not built ({e}); reinstall with a C "
                      "compiler present (`make setup` / `pip install -e .`) to build it")
    if getattr(_capture, "ABI", None) != ABI:
        return None, (f"tensortrace.agent._capture has ABI {getattr(_capture, 'ABI', None)}, this code needs {ABI}: "
                      "a stale build; reinstall (`make setup` / `pip install -e .`)")
    kinds = tuple(getattr(_capture, k, None) for k in ("K_INPUT", "K_PLAIN_INPUT", "K_OUTPUT", "K_FIRST_OUTPUT", "K_CALL"))
    if kinds != (0, 1, 2, 3, 4):
        return None, f"tensortrace.agent._capture has tap kinds {kinds}, this code needs (0, 1, 2, 3, 4): a stale build"
    return _capture, ""


def log_fallback(reason: str) -> None:
    """One line per process and reason: the agent uses the Python path, and why."""
    if reason in _logged:
        return
    _logged.add(reason)
    log.warning("tensortrace: native capture path not used (%s); capturing with the Python path", reason)
