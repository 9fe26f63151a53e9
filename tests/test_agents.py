"""The coding agents' real releases, headless, against the real daemon (issue 19).

Each agent of ``tests/agents.py`` is installed once per machine (its current release, from npm
or PyPI, into the agents' cache) and run as a user runs it, with the settings that
``docs/INTEGRATIONS.md`` shows, against a daemon on loopback behind a recording proxy
(``tests/recording_proxy.py``), so each test also sees what the agent sent. The models are
scripted (``tests/fixtures/agent_models.py``): a one-shot prompt gets ``PLAIN``'s sentence; a
tool round trip gets a call to the agent's own tool, which the agent runs and answers with the
tool's result, and then the scripted final answer, which must reach the agent's output.

With ``MLXSERVE_AGENTS_CAPTURE=DIR`` each run also writes the requests it sent to the model
routes, trimmed (``tests.agents.trimmed_capture``), to ``DIR/<test>.json``; copies
kept in ``tests/data/agents/`` are replayed by the fast ``tests/test_agent_captures.py``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.agents import (
    AGENTS,
    AGENTS_BY_NAME,
    Agent,
    RegistryUnreachable,
    cache_folder,
    install,
    trimmed_capture,
)
from tests.daemon import Daemon
from tests.fixtures.agent_models import (
    AGENT_ANSWER_TEXT,
    AGENT_CONTEXT,
    AGENT_FAMILIES,
    AGENT_SHAPE,
    AIDER_WHOLE,
    CLAUDE_BASH,
    CODEX_EXEC,
    CODEX_PATCH,
    CONTINUE_READ,
    EDITED_NOTE_TEXT,
    LLM_VERSION,
    NOTE_FILE,
    NOTE_TEXT,
    ONE_SHOT,
    OPENCODE_BASH,
)
from tests.fixtures.scripted_models import Family, make_scripted_model
from tests.recording_proxy import Exchange, RecordingProxy

pytestmark = pytest.mark.slow

AGENT_TIMEOUT_S = 300
"""One agent run: a cold prefill of an agent's ~20k-token prompt takes tens of seconds on a
busy 2-core machine; nothing here should need more."""
CAPTURE_ENV = "MLXSERVE_AGENTS_CAPTURE"
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


CLAUDE_NAME = "claude-sonnet-4-5"
"""``ONE_SHOT`` under a name Claude Code takes for one of Anthropic's models."""
SMALL_NAME = "agent-plain-small:gguf"
SMALL_CONTEXT = 4096
"""``ONE_SHOT`` loaded with a context no agent's prompt fits in."""
PATCH_NAME = "gpt-5.5"
"""``CODEX_PATCH`` under a name in Codex's own table of models (the ``models.json`` built into
its binary), whose entry gives the model Codex's patch tool (``apply_patch_tool_type``
``freeform``: a ``custom`` tool with a Lark grammar); for a name it does not know Codex offers
only its shell."""
SHORT_TRAINED_NAME = "agent-plain-short:gguf"
SHORT_TRAINED_CONTEXT = 4096
"""``ONE_SHOT`` trained (so its GGUF says) for less context than aider asks for."""


def model(family: Family) -> str:
    return f"{family.name}:gguf"


@pytest.fixture(scope="module")
def proxy(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RecordingProxy]:
    """A daemon holding every agent model (GGUF: llama.cpp prefills the agents' long prompts
    fastest), behind the recording proxy the agents talk to."""
    from modelstore.importer import import_path
    from modelstore.store import ModelStore

    root = tmp_path_factory.mktemp("agents")
    store = ModelStore(root / "home")
    for family in AGENT_FAMILIES:
        built = make_scripted_model(family, root / "models", AGENT_CONTEXT, AGENT_SHAPE)
        import_path(store, built.gguf_path, f"{family.name}:imported")
    short = make_scripted_model(ONE_SHOT, root / "short", SHORT_TRAINED_CONTEXT, AGENT_SHAPE)
    import_path(store, short.gguf_path, SHORT_TRAINED_NAME)
    daemon = Daemon(store.root).start()
    names = [(model(family), family, AGENT_CONTEXT) for family in AGENT_FAMILIES]
    extra = [
        (CLAUDE_NAME, ONE_SHOT, AGENT_CONTEXT),
        (SMALL_NAME, ONE_SHOT, SMALL_CONTEXT),
        (PATCH_NAME, CODEX_PATCH, AGENT_CONTEXT),
    ]
    for name, family, context in [*names, *extra]:
        # As a user gives a model the context an agent's prompt needs (docs/INTEGRATIONS.md).
        created = httpx.post(
            f"{daemon.url}/api/create",
            json={
                "model": name,
                "from": f"{family.name}:imported",
                "parameters": {"num_ctx": context},
                "stream": False,
            },
            timeout=60,
        )
        assert created.status_code == 200, created.text
    recording = RecordingProxy(daemon.url).start()
    yield recording
    recording.stop()
    daemon.stop()


_installed: dict[str, Path] = {}


def agent_binary(agent: Agent) -> Path:
    """The agent's executable from the cache, installed on first use; skipped (saying why) only
    when its registry cannot be reached."""
    key = agent.package.folder
    if key not in _installed:
        try:
            _installed[key] = install(agent.package, cache_folder())
        except RegistryUnreachable as error:
            pytest.skip(str(error))
    return _installed[key]


@dataclass
class Run:
    returncode: int
    output: str
    exchanges: list[Exchange]
    work: Path

    def posts(self) -> list[Exchange]:
        return [e for e in self.exchanges if e.method == "POST"]


def run_agent(
    agent: Agent,
    family: Family,
    prompt: str,
    proxy: RecordingProxy,
    tmp: Path,
    tool: bool,
    name: str | None = None,
) -> Run:
    """Run ``agent`` once on ``prompt`` against ``family``'s model (or the model ``name``)."""
    binary = agent_binary(agent)
    home, config, work = tmp / "home", tmp / "config", tmp / "work"
    for folder in (home, config, work):
        folder.mkdir()
    (work / NOTE_FILE).write_text(NOTE_TEXT)
    settings = agent.settings(proxy.url, name or model(family), str(config))
    for name, content in settings.files.items():
        (config / name).write_text(content)
    argv = [str(binary), *settings.argv[1:], prompt, *(settings.tool_argv if tool else ())]
    if agent.name == "aider" and tool:
        argv.append(NOTE_FILE)
    node = shutil.which("node")
    env = {
        "PATH": os.pathsep.join([*([str(Path(node).parent)] if node else []), "/usr/bin", "/bin"]),
        "HOME": str(home),
        # The agents' own caches last from run to run, as on a user's machine.
        "XDG_CACHE_HOME": str(cache_folder() / "xdg-cache"),
        "LANG": "C.UTF-8",
        "NO_COLOR": "1",
        "TERM": "dumb",
        "LLM_USER_PATH": str(home / "llm"),
        **settings.env,
    }
    first = len(proxy.exchanges)
    done = subprocess.run(
        argv,
        cwd=work,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=AGENT_TIMEOUT_S,
    )
    run = Run(
        done.returncode,
        ANSI.sub("", done.stdout + done.stderr),
        proxy.exchanges[first:],
        work,
    )
    save_capture(run)
    return run


def save_capture(run: Run) -> None:
    """The run's requests, trimmed, in ``$MLXSERVE_AGENTS_CAPTURE/<test>.json``."""
    folder = os.environ.get(CAPTURE_ENV)
    if folder:
        test = os.environ["PYTEST_CURRENT_TEST"].split("::")[-1].split(" ")[0]
        path = Path(folder) / (re.sub(r"[^\w-]+", "-", test).strip("-") + ".json")
        path.parent.mkdir(parents=True, exist_ok=True)
        capture = trimmed_capture([e.as_dict() for e in run.exchanges])
        path.write_text(json.dumps(capture, indent=1, ensure_ascii=False) + "\n")


def explain(run: Run) -> str:
    """What a failing assertion shows: the agent's output and each request's fate."""
    lines = [f"exit {run.returncode}", run.output[-3000:]]
    for e in run.exchanges:
        lines.append(f"{e.method} {e.path}?{e.query} -> {e.status} {e.response[:300]!r}")
    return "\n".join(lines)


def failed_posts(run: Run) -> list[Exchange]:
    return [e for e in run.posts() if e.status >= 400]


@pytest.mark.parametrize("name", [agent.name for agent in AGENTS])
def test_a_one_shot_prompt_is_answered(name: str, proxy: RecordingProxy, tmp_path: Path) -> None:
    """The agent's first request is accepted as it is sent, and the answer is printed."""
    run = run_agent(AGENTS_BY_NAME[name], ONE_SHOT, "Say hello", proxy, tmp_path, tool=False)
    assert run.returncode == 0, explain(run)
    assert ONE_SHOT.text in run.output, explain(run)
    assert run.posts() and not failed_posts(run), explain(run)


TOOL_CASES = {
    "claude-code": CLAUDE_BASH,
    "codex": CODEX_EXEC,
    "codex-oss": CODEX_EXEC,
    "opencode": OPENCODE_BASH,
    "continue-openai": CONTINUE_READ,
    "continue-ollama": CONTINUE_READ,
    "continue-anthropic": CONTINUE_READ,
    "llm": LLM_VERSION,
}
"""The agents whose own tool a scripted model calls: each reads ``NOTE_FILE`` (llm's
``llm_version`` reports llm's version instead)."""


@pytest.mark.parametrize("name", sorted(TOOL_CASES))
def test_a_tool_round_trip_reaches_the_final_answer(
    name: str, proxy: RecordingProxy, tmp_path: Path
) -> None:
    """The model calls the agent's tool; the agent runs it and sends the result back; the
    model's answer after the result is what the agent prints."""
    family = TOOL_CASES[name]
    run = run_agent(AGENTS_BY_NAME[name], family, "Read note.txt", proxy, tmp_path, tool=True)
    assert run.returncode == 0, explain(run)
    assert AGENT_ANSWER_TEXT in run.output, explain(run)
    assert not failed_posts(run), explain(run)
    last = json.dumps(run.posts()[-1].body)
    evidence = '"role": "tool"' if family is LLM_VERSION else NOTE_TEXT.split(".")[0]
    assert evidence in last, "the tool's result did not go back to the model\n" + explain(run)


def test_aider_applies_the_models_whole_file_edit(proxy: RecordingProxy, tmp_path: Path) -> None:
    """aider's tool is its edit format: the scripted reply names the file and gives its new
    content, and aider writes it."""
    run = run_agent(
        AGENTS_BY_NAME["aider"], AIDER_WHOLE, "Change the word", proxy, tmp_path, tool=True
    )
    assert run.returncode == 0, explain(run)
    assert (run.work / NOTE_FILE).read_text() == EDITED_NOTE_TEXT, explain(run)
    chats = [e for e in run.posts() if e.path == "/api/chat"]
    assert chats and NOTE_TEXT.strip() in json.dumps(chats[0].body), explain(run)


def test_codex_applies_the_models_patch_and_prints_the_answer(
    proxy: RecordingProxy, tmp_path: Path
) -> None:
    """Under a model name Codex knows, its patch tool is a ``custom`` tool with a grammar: the
    model's call comes back as a ``custom_tool_call``, Codex applies the patch to the file in
    its workspace, sends the result back, and prints the model's answer."""
    agent = AGENTS_BY_NAME["codex"]
    run = run_agent(agent, CODEX_PATCH, "Change the word", proxy, tmp_path, True, PATCH_NAME)
    assert run.returncode == 0, explain(run)
    assert (run.work / NOTE_FILE).read_text() == EDITED_NOTE_TEXT, explain(run)
    assert AGENT_ANSWER_TEXT in run.output, explain(run)
    asked = [e for e in run.posts() if e.path == "/v1/responses"]
    patch_tools = [
        tool
        for tool in asked[0].body["tools"]
        if tool.get("type") == "custom" and tool.get("name") == "apply_patch"
    ]
    assert patch_tools and patch_tools[0]["format"]["syntax"] == "lark", explain(run)
    outputs = [item.get("type") for item in asked[-1].body["input"]]
    assert "custom_tool_call" in outputs and "custom_tool_call_output" in outputs, explain(run)
    assert not failed_posts(run), explain(run)


def test_codex_oss_accepts_the_daemons_version(proxy: RecordingProxy, tmp_path: Path) -> None:
    """``codex --oss`` reads ``/api/version`` and refuses an Ollama older than it needs."""
    run = run_agent(AGENTS_BY_NAME["codex-oss"], ONE_SHOT, "Say hello", proxy, tmp_path, False)
    assert any(e.path == "/api/version" and e.status == 200 for e in run.exchanges), explain(run)
    assert "too old" not in run.output, explain(run)
    assert run.returncode == 0, explain(run)


def test_llm_sends_tools_to_a_model_without_a_tool_template(
    proxy: RecordingProxy, tmp_path: Path
) -> None:
    """llm-ollama sends ``-T`` tools only to a model whose ``capabilities`` list ``tools``:
    every model here accepts tools, native template or not (``PLAIN`` has none)."""
    run = run_agent(AGENTS_BY_NAME["llm"], ONE_SHOT, "What version?", proxy, tmp_path, True)
    assert run.returncode == 0, explain(run)
    chats = [e for e in run.posts() if e.path == "/api/chat"]
    assert chats and chats[0].body.get("tools"), explain(run)
    assert ONE_SHOT.text in run.output, explain(run)


def test_claude_code_under_a_claude_name_is_answered_without_thinking(
    proxy: RecordingProxy, tmp_path: Path
) -> None:
    """Under a ``claude-*`` name Claude Code asks for ``thinking`` with a large budget; a model
    without thinking answers anyway on the Anthropic API (docs/API.md, leniency)."""
    agent = AGENTS_BY_NAME["claude-code"]
    run = run_agent(agent, ONE_SHOT, "Say hello", proxy, tmp_path, False, CLAUDE_NAME)
    assert run.returncode == 0, explain(run)
    assert ONE_SHOT.text in run.output, explain(run)
    asked = [e.body.get("thinking") for e in run.posts() if e.path == "/v1/messages"]
    assert any(asked), explain(run)


def test_claude_code_reads_the_overflow_as_anthropics_and_does_not_retry(
    proxy: RecordingProxy, tmp_path: Path
) -> None:
    """A prompt larger than the context is refused in Anthropic's words (``prompt is too long:
    N tokens > M maximum``), which Claude Code recognises: it reports it instead of retrying
    the same request."""
    agent = AGENTS_BY_NAME["claude-code"]
    run = run_agent(agent, ONE_SHOT, "Say hello", proxy, tmp_path, False, SMALL_NAME)
    refused = [e for e in run.posts() if e.path == "/v1/messages"]
    assert len(refused) == 1 and refused[0].status == 400, explain(run)
    assert "prompt is too long" in refused[0].response, explain(run)
    assert "prompt is too long" in run.output.lower(), explain(run)


def test_aider_asking_more_context_than_the_model_was_trained_for_is_answered(
    proxy: RecordingProxy, tmp_path: Path
) -> None:
    """aider sizes ``options.num_ctx`` to its prompt, above a small model's trained context:
    the daemon holds it at the trained context, as Ollama does, instead of refusing."""
    agent = AGENTS_BY_NAME["aider"]
    run = run_agent(agent, ONE_SHOT, "Say hello", proxy, tmp_path, False, SHORT_TRAINED_NAME)
    chats = [e for e in run.posts() if e.path == "/api/chat"]
    assert chats and chats[0].body["options"]["num_ctx"] > SHORT_TRAINED_CONTEXT, explain(run)
    assert run.returncode == 0 and not failed_posts(run), explain(run)
    assert ONE_SHOT.text in run.output, explain(run)
