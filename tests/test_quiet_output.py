"""Issue 21: the daemon's stderr survives overlapping llama.cpp loads (``llamacpp/quiet.py``)."""

from __future__ import annotations

import os
import threading

import pytest

from mlxserve.runners.llamacpp import quiet


def identity(fd: int) -> tuple[int, int]:
    stat = os.fstat(fd)
    return stat.st_dev, stat.st_ino


def overlap(redirect: type) -> None:
    """Two threads: A enters, B enters, A leaves, B leaves (two model loads overlapping)."""
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first() -> None:
        with redirect(disable=False):
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second() -> None:
        a_in.wait(5)
        with redirect(disable=False):
            b_in.set()
            a_out.wait(5)

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)


def test_stderr_points_where_it_did_after_two_overlapping_redirects():
    before = identity(2), identity(1)
    overlap(quiet.QuietOutput)
    assert (identity(2), identity(1)) == before


def test_stderr_is_quiet_only_while_a_redirect_is_held():
    devnull = identity(os.open(os.devnull, os.O_RDONLY))
    with quiet.QuietOutput(disable=False):
        assert identity(2) == devnull
        with quiet.QuietOutput(disable=False):
            assert identity(2) == devnull
        assert identity(2) == devnull
    assert identity(2) != devnull


def test_llama_cpp_python_uses_the_shared_redirect():
    pytest.importorskip("llama_cpp")
    from llama_cpp import _internals, llama

    from mlxserve.runners.llamacpp.runner import import_llama_cpp

    import_llama_cpp()
    assert _internals.suppress_stdout_stderr is quiet.QuietOutput
    assert llama.suppress_stdout_stderr is quiet.QuietOutput
