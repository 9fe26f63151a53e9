"""What the coding agents really send, replayed in-process; and the integrations doc's settings.

``tests/data/agents/*.json`` are trimmed captures from ``tests/test_agents.py`` (slow: it runs
the agents' real releases): each request an agent sent to a model route, strings cut and one
tool kept per shape (``tests.agents.trimmed_capture``), so the odd parts survive (``system``
messages inside Claude Code's ``messages``, its beta fields and ``defer_loading`` tools,
Codex's ``namespace`` and hosted tools, aider's ``num_ctx``, a tool result turn). Each is sent
again, as captured but for the model, to the session's chat daemon, whose ``scripted-plain``
model answers ``PLAIN.text``: the daemon must accept it and answer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agents import AGENTS, render_settings
from tests.fixtures.scripted_models import PLAIN, model_name

CAPTURES = Path(__file__).parent / "data" / "agents"
DOC = Path(__file__).parent.parent / "docs" / "INTEGRATIONS.md"
TIMEOUT_S = 120.0
REPLAY_MODEL = model_name(PLAIN, "gguf")


def captured_requests() -> list[Any]:
    cases = []
    for path in sorted(CAPTURES.glob("*.json")):
        for index, request in enumerate(json.loads(path.read_text())):
            cases.append(pytest.param(request, id=f"{path.stem}-{index}"))
    return cases


@pytest.mark.parametrize("request_", captured_requests())
def test_a_captured_agent_request_is_answered(chat_daemon, request_: dict[str, Any]) -> None:
    body = {**request_["body"], "model": REPLAY_MODEL}
    query = f"?{request_['query']}" if request_["query"] else ""
    response = httpx.post(
        f"{chat_daemon.url}{request_['path']}{query}",
        json=body,
        headers={k: v for k, v in request_["headers"].items() if k.lower() != "user-agent"},
        timeout=TIMEOUT_S,
    )
    assert response.status_code == 200, response.text
    words = PLAIN.script[0]
    assert words in response.text, response.text[-2000:]


def test_the_integrations_doc_holds_the_settings_the_tests_run() -> None:
    """docs/INTEGRATIONS.md shows each agent's settings exactly as ``tests/agents.py`` renders
    them for ``tests/test_agents.py`` (``python -m tests.agents`` prints them), so the doc
    cannot drift from what the tests run."""
    doc = DOC.read_text()
    missing = [agent.name for agent in AGENTS if render_settings(agent) not in doc]
    assert not missing, f"regenerate with `python -m tests.agents`: {missing}"
