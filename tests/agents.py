"""The coding agents as users install and point them at the daemon: packages and settings.

One home for what ``tests/test_agents.py`` runs and what ``docs/INTEGRATIONS.md`` tells users:
each :class:`Agent` knows its package (npm or PyPI), where it lands in the agents' cache, and
the exact settings (environment, config files, command line) that aim it at a daemon. The doc's
settings blocks are rendered from here (``python -m tests.agents`` prints them, and
``test_agent_captures.test_the_integrations_doc_holds_the_settings_the_tests_run`` checks
the doc against them), so the doc says what the tests really ran.

The agents' releases install once per machine into ``$MLXSERVE_AGENTS_CACHE`` (default
``~/.cache/mlxserve-agents``), outside git, and are reused from there (remove a folder there
to test the agent's newest release). Every base URL points
at the daemon, every key is a dummy, and telemetry and update checks are off through each
agent's documented variables, so no agent reaches a model service on the internet.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

CACHE_ENV = "MLXSERVE_AGENTS_CACHE"
DEFAULT_CACHE = Path("~/.cache/mlxserve-agents")
INSTALL_TIMEOUT_S = 480
"""A first install (npm, or aider's large dependency set through pip) on a slow link; under
pytest's own per-test timeout."""
REGISTRY_TIMEOUT_S = 10
NPM_REGISTRY = "https://registry.npmjs.org/"
PYPI_INDEX = "https://pypi.org/simple/"
INSTALLED_MARKER = ".installed"
DUMMY_KEY = "mlxserve"
"""What every agent gets as its API key: the daemon asks for none."""
DOC_BASE_URL = "http://127.0.0.1:11500"
DOC_MODEL = "qwen3-coder:30b"
"""What the doc shows in place of the test's loopback URL and scripted model."""
DOC_CONFIG_FOLDERS = {
    "codex": "~/.codex",
    "opencode": "~/.config/opencode",
    "continue": "~/.continue",
}
"""Where the doc puts each agent's config files: the agent's own folder."""


@dataclass(frozen=True)
class Package:
    """One agent's release: npm packages into one ``--prefix`` folder, or PyPI packages into
    their own virtual environment."""

    registry: str
    """``npm`` or ``pypi``."""
    names: tuple[str, ...]
    folder: str
    """Its folder under the agents' cache."""
    executable: str

    def root(self, cache: Path) -> Path:
        return cache / self.folder

    def binary(self, cache: Path) -> Path:
        if self.registry == "npm":
            return self.root(cache) / "node_modules" / ".bin" / self.executable
        return self.root(cache) / "bin" / self.executable

    def installed(self, cache: Path) -> bool:
        return (self.root(cache) / INSTALLED_MARKER).exists() and self.binary(cache).exists()


@dataclass(frozen=True)
class Settings:
    """What aims an agent at the daemon: environment variables, config files (path relative
    to the agent's config folder -> content) and the command line (without the prompt)."""

    env: dict[str, str] = field(default_factory=dict)
    files: dict[str, str] = field(default_factory=dict)
    argv: tuple[str, ...] = ()
    tool_argv: tuple[str, ...] = ()
    """Extra arguments, after the prompt, for a run that lets the model use the agent's tool
    (after it: Claude Code's ``--allowedTools`` takes every argument that follows)."""


@dataclass(frozen=True)
class Agent:
    name: str
    title: str
    package: Package
    api: str
    """What the agent speaks to the daemon, for the doc."""
    settings: Callable[[str, str, str], Settings]
    """(daemon base URL, model, config folder) -> settings."""


def claude_code(base: str, model: str, config: str) -> Settings:
    return Settings(
        env={
            "ANTHROPIC_BASE_URL": base,
            "ANTHROPIC_API_KEY": DUMMY_KEY,
            "ANTHROPIC_MODEL": model,
            "ANTHROPIC_DEFAULT_HAIKU_MODEL": model,
            "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        },
        argv=("claude", "-p"),
        tool_argv=("--allowedTools", "Bash(cat:*)"),
    )


CODEX_TELEMETRY_OFF = """check_for_update_on_startup = false

[analytics]
enabled = false
"""


def codex(base: str, model: str, config: str) -> Settings:
    toml = f"""model = "{model}"
model_provider = "mlxserve"
{CODEX_TELEMETRY_OFF}
[model_providers.mlxserve]
name = "mlxserve"
base_url = "{base}/v1"
wire_api = "responses"
"""
    return Settings(
        env={"CODEX_HOME": config},
        files={"config.toml": toml},
        argv=(
            "codex",
            "exec",
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
        ),
    )


def codex_oss(base: str, model: str, config: str) -> Settings:
    return Settings(
        env={"CODEX_HOME": config, "CODEX_OSS_BASE_URL": f"{base}/v1"},
        files={"config.toml": f'oss_provider = "ollama"\n{CODEX_TELEMETRY_OFF}'},
        argv=(
            "codex",
            "exec",
            "--oss",
            "-m",
            model,
            "--skip-git-repo-check",
            "--dangerously-bypass-approvals-and-sandbox",
        ),
    )


def opencode(base: str, model: str, config: str) -> Settings:
    document = {
        "$schema": "https://opencode.ai/config.json",
        "provider": {
            "mlxserve": {
                "npm": "@ai-sdk/openai-compatible",
                "name": "mlxserve",
                "options": {"baseURL": f"{base}/v1", "apiKey": DUMMY_KEY},
                "models": {model: {"name": model}},
            }
        },
        "model": f"mlxserve/{model}",
        "autoupdate": False,
        "share": "disabled",
    }
    return Settings(
        env={
            "OPENCODE_CONFIG": f"{config}/opencode.json",
            "OPENCODE_DISABLE_AUTOUPDATE": "1",
            "OPENCODE_DISABLE_MODELS_FETCH": "1",
            "OPENCODE_DISABLE_LSP_DOWNLOAD": "1",
        },
        files={"opencode.json": json.dumps(document, indent=2) + "\n"},
        argv=("opencode", "run"),
    )


def continue_cli(provider: str) -> Callable[[str, str, str], Settings]:
    """Continue's ``cn`` through one of its providers: ``openai``, ``ollama``, ``anthropic``."""
    api_base = {"openai": "{base}/v1", "ollama": "{base}", "anthropic": "{base}/v1"}[provider]

    def settings(base: str, model: str, config: str) -> Settings:
        yaml = f"""name: mlxserve
version: 1.0.0
schema: v1
models:
  - name: {model}
    provider: {provider}
    model: {model}
    apiBase: {api_base.format(base=base)}
    apiKey: {DUMMY_KEY}
    roles: [chat, edit, apply]
    capabilities: [tool_use]
"""
        return Settings(
            env={"CONTINUE_CLI_ENABLE_TELEMETRY": "0"},
            files={"config.yaml": yaml},
            argv=("cn", "--config", f"{config}/config.yaml", "-p"),
        )

    return settings


def aider(base: str, model: str, config: str) -> Settings:
    return Settings(
        env={"OLLAMA_API_BASE": base},
        argv=(
            "aider",
            "--model",
            f"ollama_chat/{model}",
            "--yes-always",
            "--no-git",
            "--no-check-update",
            "--analytics-disable",
            "--no-show-model-warnings",
            "--no-pretty",
            "--message",
        ),
    )


def llm_ollama(base: str, model: str, config: str) -> Settings:
    return Settings(
        env={"OLLAMA_HOST": base},
        argv=("llm", "-m", f"ollama/{model}"),
        tool_argv=("-T", "llm_version"),
    )


CLAUDE_PACKAGE = Package("npm", ("@anthropic-ai/claude-code",), "npm-claude-code", "claude")
CODEX_PACKAGE = Package("npm", ("@openai/codex",), "npm-codex", "codex")
CONTINUE_PACKAGE = Package("npm", ("@continuedev/cli",), "npm-continue", "cn")
AGENTS = (
    Agent("claude-code", "Claude Code", CLAUDE_PACKAGE, "Anthropic Messages", claude_code),
    Agent("codex", "Codex CLI (provider)", CODEX_PACKAGE, "OpenAI Responses", codex),
    Agent("codex-oss", "Codex CLI (`--oss`)", CODEX_PACKAGE, "OpenAI Responses", codex_oss),
    Agent(
        "opencode",
        "opencode",
        Package("npm", ("opencode-ai",), "npm-opencode", "opencode"),
        "OpenAI chat completions",
        opencode,
    ),
    Agent(
        "continue-openai",
        "Continue CLI (OpenAI provider)",
        CONTINUE_PACKAGE,
        "OpenAI chat completions",
        continue_cli("openai"),
    ),
    Agent(
        "continue-ollama",
        "Continue CLI (Ollama provider)",
        CONTINUE_PACKAGE,
        "OpenAI chat completions under the Ollama base URL (`/v1/chat/completions`)",
        continue_cli("ollama"),
    ),
    Agent(
        "continue-anthropic",
        "Continue CLI (Anthropic provider)",
        CONTINUE_PACKAGE,
        "Anthropic Messages",
        continue_cli("anthropic"),
    ),
    Agent(
        "aider",
        "aider",
        Package("pypi", ("aider-chat",), "py-aider", "aider"),
        "Ollama (`ollama_chat/`)",
        aider,
    ),
    Agent(
        "llm",
        "llm with llm-ollama",
        Package("pypi", ("llm", "llm-ollama"), "py-llm", "llm"),
        "Ollama",
        llm_ollama,
    ),
)
AGENTS_BY_NAME = {agent.name: agent for agent in AGENTS}


def cache_folder() -> Path:
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()


class RegistryUnreachable(Exception):
    """The package registry did not answer (or npm, its client, is missing): the caller
    skips, saying so."""


def registry_reachable(package: Package) -> bool:
    url = NPM_REGISTRY + package.names[0] if package.registry == "npm" else PYPI_INDEX
    try:
        with urllib.request.urlopen(url, timeout=REGISTRY_TIMEOUT_S):
            return True
    except OSError:
        return False


def install(package: Package, cache: Path) -> Path:
    """The agent's executable, installing its current release first unless the cache has it.
    Raises :class:`RegistryUnreachable` when it must install and the registry does not answer."""
    if package.installed(cache):
        return package.binary(cache)
    if package.registry == "npm" and shutil.which("npm") is None:
        raise RegistryUnreachable("npm is not installed (scripts/install-system-deps.sh does it)")
    if not registry_reachable(package):
        where = "npm registry" if package.registry == "npm" else "PyPI"
        raise RegistryUnreachable(f"the {where} cannot be reached to install {package.names}")
    root = package.root(cache)
    root.mkdir(parents=True, exist_ok=True)
    if package.registry == "npm":
        commands = [["npm", "install", "--prefix", str(root), "--no-audit", "--no-fund"]]
        commands[0] += package.names
    else:
        commands = [
            [sys.executable, "-m", "venv", str(root)],
            [str(root / "bin" / "pip"), "install", "--quiet", *package.names],
        ]
    for command in commands:
        subprocess.run(command, check=True, timeout=INSTALL_TIMEOUT_S, capture_output=True)
    (root / INSTALLED_MARKER).write_text("\n".join(package.names) + "\n")
    return package.binary(cache)


MODEL_ROUTES = (
    "/api/chat",
    "/api/generate",
    "/v1/chat/completions",
    "/v1/responses",
    "/v1/messages",
)
TRIM_CHARS = 48
"""Strings in a kept capture are cut to this: the structure is what a replay checks."""
UNTRIMMED_KEYS = frozenset({"pattern", "model", "type", "role", "name", "arguments", "input"})


def trimmed_capture(exchanges: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The requests an agent sent to the model routes, small enough to replay on the tiny
    fixtures: each long string cut, and of the tools only the first of each shape (its type
    and its keys: a ``namespace``, a ``custom`` tool, one with ``defer_loading``...)."""
    kept = []
    for exchange in exchanges:
        if exchange["method"] != "POST" or exchange["path"] not in MODEL_ROUTES:
            continue
        body = _one_tool_per_shape(exchange["body"])
        kept.append(
            {
                "path": exchange["path"],
                "query": exchange["query"],
                "headers": exchange["headers"],
                "body": _trim(body),
            }
        )
    return kept


def _one_tool_per_shape(holder: dict[str, Any]) -> dict[str, Any]:
    """``holder`` with the first tool of each shape in its ``tools`` (a ``namespace`` tool's
    own ``tools`` too)."""
    if not isinstance(holder.get("tools"), list):
        return holder
    shapes: dict[tuple[Any, ...], dict[str, Any]] = {}
    for tool in holder["tools"]:
        shapes.setdefault((tool.get("type"), *sorted(tool)), _one_tool_per_shape(tool))
    return {**holder, "tools": list(shapes.values())}


def _trim(value: Any, key: str = "") -> Any:
    if isinstance(value, dict):
        return {k: _trim(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [_trim(v, key) for v in value]
    if isinstance(value, str) and len(value) > TRIM_CHARS and key not in UNTRIMMED_KEYS:
        return value[:TRIM_CHARS]
    return value


def render_settings(agent: Agent) -> str:
    """The agent's settings as the doc shows them (``DOC_BASE_URL``, ``DOC_MODEL``)."""
    config = DOC_CONFIG_FOLDERS.get(agent.name.split("-")[0], "~")
    settings = agent.settings(DOC_BASE_URL, DOC_MODEL, config)
    lines = ["```sh"]
    lines += [f"export {key}={value}" for key, value in settings.env.items()]
    if settings.files:
        lines.append(f"mkdir -p {config}")
    for name, content in settings.files.items():
        lines += [f"cat > {config}/{name} <<'EOF'", content.rstrip("\n"), "EOF"]
    command = " ".join(_quote(part) for part in settings.argv)
    lines.append(f'{command} "Say hello"')
    if settings.tool_argv:
        tool = " ".join(_quote(part) for part in settings.tool_argv)
        lines.append(f'{command} "Read note.txt" {tool}')
    lines.append("```")
    return "\n".join(lines)


def _quote(part: str) -> str:
    return f"'{part}'" if any(c in part for c in " ()*") else part


if __name__ == "__main__":
    for agent in AGENTS:
        print(f"### {agent.title}\n\nSpeaks: {agent.api}.\n\n{render_settings(agent)}\n")
