"""``mlxctl run``'s chat, driven through a real pseudo-terminal (pexpect) as a person types:
a ``\"\"\"`` block and a bracketed paste are one turn each, every slash command, Ctrl-C during an
answer and at the prompt; and piped stdin put before the prompt argument."""

from __future__ import annotations

import json
import os

import pexpect
import pytest

from mlxctl.names import OLLAMA_LIBRARY_ENV
from modelstore import mediatypes
from modelstore.importer import import_path
from modelstore.store import ModelStore
from tests.cli import MLXCTL, NO_LIBRARY, mlxctl

PROMPT = ">>> "
NO_DAEMON = {"MLXSERVE_PORT": "1"}


@pytest.fixture(scope="module")
def home(tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("repl-home")
    import_path(ModelStore(root), tiny_models.gguf_path, "tiny:gguf", allow_link=True)
    return root


def chat(home, *args: str) -> pexpect.spawn:
    env = {
        **os.environ,
        "MLXSERVE_HOME": str(home),
        "TERM": "xterm",
        OLLAMA_LIBRARY_ENV: NO_LIBRARY,
        **NO_DAEMON,
    }
    child = pexpect.spawn(
        MLXCTL,
        ["run", "--local", "tiny:gguf", "--temperature", "0", *args],
        env=env,
        encoding="utf-8",
        timeout=120,
        dimensions=(50, 200),
    )
    child.expect_exact(PROMPT)
    return child


def say(child: pexpect.spawn, line: str) -> str:
    """Send a line; return what was printed before the next prompt."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return child.before.replace("\r\n", "\n")


def leave(child: pexpect.spawn) -> None:
    child.sendeof()
    child.expect(pexpect.EOF)
    child.close()
    assert child.exitstatus == 0


def test_a_block_and_a_paste_are_each_one_turn(home):
    child = chat(home, "--verbose", "--max-tokens", "2")
    child.sendline('"""first line')
    child.expect_exact("... ")
    shown = say(child, 'second line"""')
    assert "user\nfirst line\nsecond line<|im_end|>" in shown
    child.send("\x1b[200~pasted one\npasted two\x1b[201~\r")
    child.expect_exact(PROMPT)
    shown = child.before.replace("\r\n", "\n")
    assert "pasted one\npasted two<|im_end|>" in shown
    assert shown.count("rendered prompt") == 1, "the paste was split into several turns"
    leave(child)


def test_set_and_show_take_ollamas_names_and_ours(home):
    child = chat(home, "--max-tokens", "2")
    assert "Set parameter 'num_predict' to '3'" in say(child, "/set parameter num_predict 3")
    assert "Set parameter" in say(child, "/set parameter repetition_penalty 1.1")
    assert "Set parameter 'num_ctx' to '1024'" in say(child, "/set parameter num_ctx 1024")
    assert "Set system message." in say(child, "/set system Be brief.")
    assert "Set 'verbose' mode." in say(child, "/set verbose")
    assert "Set 'noverbose' mode." in say(child, "/set noverbose")
    assert "Set 'nothink' mode." in say(child, "/set nothink")
    info = say(child, "/show info")
    assert "architecture    llama" in info and "context length  1024" in info
    parameters = say(child, "/show parameters")
    assert "max_tokens              3" in parameters
    assert "repetition_penalty      1.1" in parameters
    modelfile = say(child, "/show modelfile")
    assert "FROM tiny:gguf" in modelfile and 'SYSTEM """Be brief."""' in modelfile
    assert "PARAMETER num_predict 3" in modelfile and "PARAMETER repeat_penalty 1.1" in modelfile
    assert "PARAMETER num_ctx 1024" in modelfile
    assert "Be brief." in say(child, "/show system")
    assert "<|im_start|>" in say(child, "/show template")
    assert say(child, "/show license").strip()
    assert "Unknown parameter 'bogus'" in say(child, "/set parameter bogus 1")
    assert "Unknown command '/frobnicate'. Type /? for help" in say(child, "/frobnicate")
    assert "Available Commands" in say(child, "/?")
    assert "Cleared session context" in say(child, "/clear")
    too_big = say(child, "/set parameter num_ctx 999999")
    assert "Traceback" not in too_big
    assert "context length  2048" in say(child, "/show info"), "the context loaded, not asked"
    say(child, "/set parameter num_ctx 1024")
    missing = say(child, "/load nothing-here:1")
    assert "Error [model_not_found]" in missing and "Traceback" not in missing
    info = say(child, "/show info")
    assert "model           tiny:gguf" in info and "context length  1024" in info, (
        "a failed /load keeps the model as it was"
    )
    leave(child)


def test_save_stores_the_settings_and_load_switches_model(home):
    child = chat(home)
    say(child, "/set parameter num_predict 3")
    say(child, "/set system Answer in French.")
    assert "Created new model 'mine:latest'" in say(child, "/save mine")
    store = ModelStore(home)
    saved = store.resolve("mine")
    assert json.loads(store.text_layer(saved, mediatypes.PARAMS))["max_tokens"] == 3
    assert store.text_layer(saved, mediatypes.SYSTEM_PROMPT) == "Answer in French."
    assert "Loading model 'mine'" in say(child, "/load mine")
    assert "model           mine" in say(child, "/show info")
    answer = say(child, "Hello")
    assert "Traceback" not in answer
    leave(child)


def test_ctrl_c_stops_an_answer_and_at_the_prompt_does_not_leave(home):
    child = chat(home, "--max-tokens", "100000", "--verbose")
    child.sendline("Tell me a long story")
    child.expect_exact("--- rendered prompt")
    child.expect_exact("\r\n---\r\n")  # the answer streams from here
    child.expect(r"\S")  # its first characters: Ctrl-C at once (the tiny model fills its
    child.sendintr()  # context within a second or two on a quiet machine)
    child.expect_exact(PROMPT)
    assert "[stopped]" in child.before and "done reason:          cancelled" in child.before
    child.sendintr()
    child.expect_exact(PROMPT)
    assert "Use Ctrl-D or /bye to exit." in child.before
    assert "Chatting" not in say(child, "/set parameter num_predict 2")
    assert "Traceback" not in say(child, "Hi")
    leave(child)


def test_piped_stdin_comes_before_the_prompt_argument(home):
    result = mlxctl(
        "run",
        "--local",
        "--verbose",
        "--max-tokens",
        "1",
        "tiny:gguf",
        "Summarize",
        home=home,
        stdin="Some notes\n",
        env=NO_DAEMON,
    )
    assert "Some notes\n\nSummarize" in result.stderr
