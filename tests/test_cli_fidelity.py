"""What a new user meets first in the CLI: unknown names, finding the daemon, ``--verbose``,
a port in use, ``mlxserve -h``, and an answer cut with Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess

import pytest

from tests.cli import mlxctl
from tests.daemon import MLXSERVE

STATS_ROWS = (
    "ran:",
    "runner:",
    "load duration:",
    "prompt eval count:",
    "eval count:",
    "eval rate:",
    "total duration:",
    "done reason:",
)
NO_DAEMON = {"MLXSERVE_PORT": "1"}


def test_an_unknown_one_word_name_suggests_close_names_and_the_default_model(tiny_store):
    result = mlxctl("run", "tiny", home=tiny_store.root, check=False, env=NO_DAEMON)
    assert result.returncode == 1
    assert (
        "Did you mean: tiny:gguf, tiny:mlx?" in result.stderr
        or "Did you mean: tiny:mlx, tiny:gguf?" in result.stderr
    ), result.stderr
    result = mlxctl("run", "hi", home=tiny_store.root, check=False, env=NO_DAEMON)
    assert 'mlxctl run smollm2:135m "hi"' in result.stderr
    assert "Traceback" not in result.stderr


def test_through_the_daemon_the_suggestions_come_from_its_store(daemon):
    result = mlxctl(
        "run",
        "tiny:ggu",
        "Hi",
        home=daemon.home,
        check=False,
        env={"MLXSERVE_HOST": f"127.0.0.1:{daemon.port}"},
    )
    assert result.returncode == 1
    assert "Did you mean: tiny:gguf" in result.stderr, result.stderr


def test_verbose_prints_the_same_table_in_process_and_through_the_daemon(daemon):
    local = mlxctl(
        "run",
        "--local",
        "--verbose",
        "tiny:gguf",
        "Hello",
        "--max-tokens",
        "2",
        home=daemon.home,
        env={"MLXSERVE_PORT": str(daemon.port)},
    )
    assert "ran:                  in this process" in local.stderr
    assert "rendered prompt (" in local.stderr and "<|im_start|>user\nHello" in local.stderr
    remote = mlxctl(
        "run",
        "--verbose",
        "tiny:gguf",
        "Hello",
        "--max-tokens",
        "2",
        home=daemon.home,
        env={"MLXSERVE_HOST": f"127.0.0.1:{daemon.port}"},
    )
    assert f"through the daemon at 127.0.0.1:{daemon.port}" in remote.stderr, remote.stderr
    for row in STATS_ROWS:
        assert row in local.stderr and row in remote.stderr, row
    assert rendered_prompt(remote.stderr) == rendered_prompt(local.stderr)
    flag = mlxctl(
        "run",
        "--verbose",
        "--host",
        f"127.0.0.1:{daemon.port}",
        "tiny:gguf",
        "Hi",
        "--max-tokens",
        "1",
        home=daemon.home,
        env=NO_DAEMON,
    )
    assert "through the daemon" in flag.stderr


def rendered_prompt(stderr: str) -> str:
    """The ``--verbose`` block that shows the prompt as the model sees it, token count included."""
    match = re.search(r"--- rendered prompt \(\d+ tokens\) ---\n.*?\n---\n", stderr, re.S)
    assert match, stderr
    return match.group(0)


@pytest.mark.parametrize(
    "flags",
    [("--system", "Answer in one word."), ("--raw",)],
    ids=["system", "raw"],
)
def test_verbose_through_the_daemon_shows_the_prompt_as_in_process(daemon, flags):
    """The daemon renders it (``/apply-template``) and counts it (``/tokenize``)."""
    run = ("run", "--verbose", *flags, "tiny:gguf", "Hello", "--max-tokens", "1")
    local = mlxctl(*run, "--local", home=daemon.home)
    remote = mlxctl(*run, home=daemon.home, env={"MLXSERVE_HOST": f"127.0.0.1:{daemon.port}"})
    assert "through the daemon" in remote.stderr
    assert rendered_prompt(remote.stderr) == rendered_prompt(local.stderr)
    if flags[0] == "--system":
        assert "<|im_start|>system\nAnswer in one word.<|im_end|>" in rendered_prompt(remote.stderr)
    else:
        assert "---\nHello\n---" in rendered_prompt(remote.stderr)


def test_serve_on_a_port_in_use_is_one_line_and_exit_1(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [MLXSERVE, "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "MLXSERVE_HOME": str(tmp_path)},
        )
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "already in use" in result.stderr
    assert "listening" not in result.stderr + result.stdout


def test_mlxserve_h_prints_help():
    result = subprocess.run([MLXSERVE, "-h"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0 and "Usage: mlxserve" in result.stdout


def test_an_answer_cut_with_ctrl_c_is_dropped_from_the_history(tiny_store, monkeypatch):
    from mlxctl.run_command import ChatState, Session, chat_turn

    monkeypatch.setenv("MLXSERVE_HOME", str(tiny_store.root))
    session = Session("tiny:gguf", "llamacpp", as_json=False, verbose=False)
    session.load()
    try:
        state = ChatState({"max_tokens": 1})
        chat_turn(session, state, "Hi")
        assert len(state.history) == 2
        state.overrides = {"max_tokens": 100_000, "temperature": 1.0}
        show, pressed = session._show, []

        async def press_ctrl_c_after_the_first_piece(*args: object) -> None:
            """The user's Ctrl-C, a real SIGINT, once the answer has begun to stream."""
            await show(*args)
            if not pressed:
                pressed.append(True)
                os.kill(os.getpid(), signal.SIGINT)

        monkeypatch.setattr(session, "_show", press_ctrl_c_after_the_first_piece)
        chat_turn(session, state, "Tell a long story")
        assert session.last_reason == "cancelled"
        assert [m["content"] for m in state.history] == ["Hi", state.history[1]["content"]]
    finally:
        session.close()


def test_ctrl_c_before_the_answer_streams_drops_the_turn_and_frees_the_model(
    tiny_store, monkeypatch
):
    """A Ctrl-C while the prompt is prepared (off the event loop) cancels the whole turn: it
    leaves no half-started answer behind to stream into the next one, nor a slot held."""
    import time

    import pytest

    from mlxctl.run_command import ChatState, Session, chat_turn
    from mlxserve.chat import core

    monkeypatch.setenv("MLXSERVE_HOME", str(tiny_store.root))
    session = Session("tiny:gguf", "llamacpp", as_json=False, verbose=False)
    session.load()
    try:
        state = ChatState({"max_tokens": 1})
        prepare = core.prepare

        def press_ctrl_c_while_preparing(*args: object) -> object:
            time.sleep(0.5)  # the event loop waits on this thread meanwhile
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.5)  # the loop's handler runs meanwhile
            return prepare(*args)

        monkeypatch.setattr(core, "prepare", press_ctrl_c_while_preparing)
        with pytest.raises(KeyboardInterrupt):
            chat_turn(session, state, "Hi")
        monkeypatch.setattr(core, "prepare", prepare)
        assert state.history == []
        assert session.held.queue.active == 0
        chat_turn(session, state, "Hello")
        assert state.history[0]["content"] == "Hello"
        assert session.last_reason == "length"
    finally:
        session.close()


def test_mlxserve_host_takes_host_and_port_as_ollama_host(monkeypatch, tmp_path):
    import pytest

    from mlxserve.server.config import ConfigError, load_settings

    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    monkeypatch.delenv("MLXSERVE_CONFIG", raising=False)
    for value, expected in [
        ("127.0.0.1:11600", ("127.0.0.1", 11600)),
        ("http://[::1]:9", ("::1", 9)),
        ("localhost", ("localhost", 11500)),
    ]:
        monkeypatch.setenv("MLXSERVE_HOST", value)
        monkeypatch.delenv("MLXSERVE_PORT", raising=False)
        settings = load_settings()
        assert (settings.host, settings.port) == expected, value
    monkeypatch.setenv("MLXSERVE_HOST", "http://user@evil.example:1")
    with pytest.raises(ConfigError):
        load_settings()
