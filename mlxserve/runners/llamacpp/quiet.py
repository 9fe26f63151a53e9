"""One process-wide, reference-counted quiet-output redirect for llama-cpp-python.

llama-cpp-python silences llama.cpp's own prints while it makes a model or a context
(``llama_cpp._utils.suppress_stdout_stderr``): it saves file descriptors 1 and 2, points them
at ``/dev/null``, and restores what it saved. That is not re-entrant: when two loads overlap on
two threads, the second saves the first one's ``/dev/null`` and restores it last, and the
daemon's stderr (its log) stays dark for the rest of its life (issue 21). ``QuietOutput``
replaces it: the first user redirects, the last one restores the descriptors the first saved.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from typing import Any

_LOCK = threading.Lock()
_FDS = (1, 2)
_saved: list[int] = []
_users = 0
UPSTREAM_MODULES = ("_utils", "_internals", "llama", "llama_chat_format")
"""The llama_cpp modules that hold a ``suppress_stdout_stderr`` name of their own."""


class QuietOutput:
    """Drop-in for ``suppress_stdout_stderr(disable=verbose)``."""

    def __init__(self, disable: bool = True) -> None:
        self.disable = disable

    def __enter__(self) -> QuietOutput:
        global _users
        if self.disable:
            return self
        with _LOCK:
            if _users == 0:
                for stream in (sys.stdout, sys.stderr):
                    with contextlib.suppress(Exception):
                        stream.flush()
                _saved[:] = [os.dup(fd) for fd in _FDS]
                null = os.open(os.devnull, os.O_WRONLY)
                for fd in _FDS:
                    os.dup2(null, fd)
                os.close(null)
            _users += 1
        return self

    def __exit__(self, *exc: object) -> None:
        global _users
        if self.disable:
            return
        with _LOCK:
            _users -= 1
            if _users == 0:
                for fd, saved in zip(_FDS, _saved, strict=True):
                    os.dup2(saved, fd)
                    os.close(saved)
                _saved.clear()


def install(llama_cpp: Any) -> Any:
    """``llama_cpp`` with ``QuietOutput`` in place of its own redirect. Idempotent."""
    import importlib

    for name in UPSTREAM_MODULES:
        with contextlib.suppress(ImportError):
            module = importlib.import_module(f"llama_cpp.{name}")
            if hasattr(module, "suppress_stdout_stderr"):
                module.suppress_stdout_stderr = QuietOutput
    return llama_cpp
