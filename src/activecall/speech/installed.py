"""What is installed (optional packages, shipped models), remembered for a few seconds.

A playbook call that names no recogniser or voice gets the defaults by what is installed
(``speech/defaults.py``), so every call set-up asked ``importlib.util.find_spec`` (a walk of
``sys.path``, a ``stat`` per entry) and checked model files: about a fifth of a call's CPU in the
calls-per-second profile (docs/benchmarks.md, "Cheaper calls").  The answers are kept for
``RECHECK`` seconds, so a package installed or removed while the daemon runs is still noticed,
within seconds, without a restart (like ``tts/flite.py``'s ``_which`` for programs).
"""

from __future__ import annotations

import functools
import importlib.util
import time

RECHECK = 10.0  # seconds an answer is trusted without looking again

_MISSING = object()


def remembered(fn):
    """``fn(*args)`` (hashable arguments, no side effects) remembered for ``RECHECK`` seconds;
    ``fn.forget()`` drops what it remembers (tests)."""
    memo: dict = {}

    @functools.wraps(fn)
    def wrapper(*args):
        now = time.monotonic()
        known = memo.get(args, _MISSING)
        if known is not _MISSING and now - known[0] < RECHECK:
            return known[1]
        value = fn(*args)
        memo[args] = (now, value)
        return value

    wrapper.forget = memo.clear
    return wrapper


@remembered
def module_found(name: str) -> bool:
    """``importlib.util.find_spec(name) is not None`` (no import), remembered."""
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
