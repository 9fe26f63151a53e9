"""llama-cpp-python, imported once the same way by every llama.cpp runner and bench: a clear
error when the extra is not installed, made safe for this CPU (``platform.py``), and with its
quiet-output redirect made re-entrant (``quiet.py``)."""

from __future__ import annotations

from typing import Any

from mlxserve import platform
from mlxserve.runners.llamacpp import quiet
from mlxserve.runners.skeleton import import_library


def import_llama_cpp() -> Any:
    """llama-cpp-python, made safe for this CPU (``platform.make_llama_cpp_safe``), with its
    quiet-output redirect made re-entrant (``runners/llamacpp/quiet.py``)."""
    (llama_cpp,) = import_library("llamacpp", "llama_cpp")
    return platform.make_llama_cpp_safe(quiet.install(llama_cpp))
