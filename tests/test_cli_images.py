"""``mlxctl run`` with image paths in the prompt, as ``ollama run llava "What is in ./cat.png?"``:
a vision model gets the file as an image (through a daemon and in process, one answer and a
chat), a text model gets the text as typed, and a path that names no image stays text."""

from __future__ import annotations

import json
import os
import re

import pytest

from mlxctl.image_paths import take_images
from tests.cli import MLXCTL
from tests.cli import mlxctl as run_mlxctl
from tests.fixtures.gguf_mmproj import IMAGE_TOKENS
from tests.test_default_model import _read_until
from tests.test_vision import png
from tests.test_vision_gguf import gguf_vision_store, mmproj  # noqa: F401 - fixtures

MODEL = "tiny:gguf-vision"


@pytest.fixture
def in_folder(tmp_path, monkeypatch):
    (tmp_path / "red.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "my photo.jpg").write_bytes(png((0, 0, 255)))
    (tmp_path / "notes.txt").write_text("not an image")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_paths_to_image_files_are_taken_out_of_the_text(in_folder):
    text, images = take_images("Compare ./red.png with 'my photo.jpg', please.")
    assert text == "Compare with , please."
    assert images == [png((255, 0, 0)), png((0, 0, 255))]
    text, images = take_images(f"What is in {in_folder}/my\\ photo.jpg?")
    assert (text, images) == ("What is in ?", [png((0, 0, 255))])


@pytest.mark.parametrize(
    "text",
    ["Summarize ./notes.txt", "What is in ./absent.png?", "Name a file like red.png", "No path"],
)
def test_what_names_no_image_file_stays_as_typed(in_folder, text):
    assert take_images(text) == (text, [])


@pytest.fixture(scope="module")
def vision_daemon(gguf_vision_store):  # noqa: F811 - the fixture above
    from tests.daemon import Daemon

    running = Daemon(gguf_vision_store.root).start()
    yield running
    running.stop()


def run(daemon, in_folder, *args: str, stdin: str | None = None) -> list[dict]:
    result = run_mlxctl(
        "run",
        *args,
        "--temperature",
        "0",
        "--max-tokens",
        "2",
        "--json",
        home=daemon.home,
        check=False,
        cwd=in_folder,
        stdin=stdin,
        env={"MLXSERVE_PORT": str(daemon.port)},
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def prompt_tokens(lines: list[dict]) -> int:
    return lines[-1]["prompt_eval_count"]


@pytest.mark.parametrize("where", [[], ["--local"]], ids=["through the daemon", "in process"])
def test_one_answer_sends_the_image_a_prompt_names(vision_daemon, in_folder, where):
    with_image = run(vision_daemon, in_folder, *where, MODEL, "What is in ./red.png?")
    without = run(vision_daemon, in_folder, *where, MODEL, "What is in ?")
    assert prompt_tokens(with_image) - prompt_tokens(without) == IMAGE_TOKENS


def test_a_chat_keeps_the_image_for_its_later_turns(vision_daemon, in_folder):
    import pty

    env = {
        **os.environ,
        "MLXSERVE_HOME": str(vision_daemon.home),
        "MLXSERVE_PORT": str(vision_daemon.port),
        "TERM": "dumb",
    }
    command = [MLXCTL, "run", MODEL, "--temperature", "0", "--max-tokens", "2", "--verbose"]
    pid, fd = pty.fork()
    if pid == 0:
        os.chdir(in_folder)
        os.execve(MLXCTL, command, env)
    try:
        _read_until(fd, b">>> ")
        os.write(fd, b"What is in ./red.png?\n")
        first = _read_until(fd, b">>> ")
        os.write(fd, b"And now?\n")
        second = _read_until(fd, b">>> ")
        os.write(fd, b"/bye\n")
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        os.close(fd)
    assert b"Added image './red.png'" in first
    counts = [int(re.search(rb"prompt eval count: *(\d+)", seen)[1]) for seen in (first, second)]
    assert counts[0] > IMAGE_TOKENS and counts[1] > counts[0] + IMAGE_TOKENS  # sent again


def test_a_text_model_gets_the_path_as_text(vision_daemon, in_folder):
    with_path = run(vision_daemon, in_folder, "tiny:gguf", "What is in ./red.png?")
    assert prompt_tokens(with_path) > 0  # answered: no image was sent to a text model
