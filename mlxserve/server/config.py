"""Daemon settings, declared once: defaults < user config file < environment < flags.

Each field of ``Settings`` carries its help line, its environment variable (``MLXSERVE_`` and its
name unless it says otherwise) and whether ``mlxserve``/``mlxctl serve`` take it as a flag
(``setting``, kept in ``metadata``); the config-file keys (the field
names), the environment table, the command-line options, ``mlxctl serve --help`` and the
reference in docs/SETTINGS.md are all derived from it, as ``modelstore/parameters.py`` does for
sampling. A user file (``$MLXSERVE_HOME/config.json`` or ``$MLXSERVE_CONFIG``) overrides the
defaults, then ``MLXSERVE_*`` environment variables, then flags.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from modelstore.errors import MlxserveError
from modelstore.store import HOME_ENV, default_root

DEFAULT_PORT = 11500
"""Not Ollama's 11434, so both can run side by side (docs/TROUBLESHOOTING.md)."""
CONFIG_ENV = "MLXSERVE_CONFIG"
"""Where the user config file is, when not ``$MLXSERVE_HOME/config.json``."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})


class ConfigError(MlxserveError):
    code = "invalid_config"
    http_status = 400


_DURATION = re.compile(r"(-?\d+(?:\.\d+)?)(ms|s|m|h)?")
_UNIT_SECONDS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


MAX_DURATION_S = 100 * 365 * 24 * 3600.0
"""Longer durations are held at this (a century): an expiry time must stay a real date."""


def _bounded(seconds: float) -> float:
    return max(-MAX_DURATION_S, min(MAX_DURATION_S, seconds))


def parse_duration(value: Any) -> float:
    """Ollama's ``keep_alive``: ``"5m"``, ``"1h30m"``, seconds as a number; negative = forever."""
    if isinstance(value, bool):
        raise ConfigError(f"invalid duration {value!r}")
    if isinstance(value, int | float):
        if not math.isfinite(value):
            raise ConfigError(f"invalid duration {value!r}")
        return _bounded(float(value))
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"invalid duration {value!r}")
    total, position, text = 0.0, 0, value.strip()
    while position < len(text):
        match = _DURATION.match(text, position)
        if not match or match.end() == position:
            raise ConfigError(f"invalid duration {value!r} (examples: 30s, 5m, 1h, -1)")
        total += _bounded(float(match.group(1)) * _UNIT_SECONDS[match.group(2)])
        position = match.end()
    return _bounded(total)


def setting(
    default: Any,
    help: str,
    *,
    env: str | None = None,
    shown: str | None = None,
    flag: bool = True,
    factory: bool = False,
) -> Any:
    """One setting: its default (``factory``: a callable making it), its one-line help, the
    default as a person writes it (``shown``, e.g. ``5m``) and whether the daemon takes it as a
    flag. Its variable is ``MLXSERVE_`` and the name in capitals unless ``env`` says otherwise."""
    metadata = {"env": env, "help": help, "shown": shown, "flag": flag}
    if factory:
        return field(default_factory=default, metadata=metadata)
    return field(default=default, metadata=metadata)


@dataclass
class Settings:
    host: str = setting(
        "127.0.0.1", "Address to bind; takes host:port or a URL, as OLLAMA_HOST does."
    )
    port: int = setting(DEFAULT_PORT, "Port to listen on.")
    home: Path = setting(
        default_root,
        "The model store (and the user config file, config.json).",
        env=HOME_ENV,
        shown="~/.mlxserve",
        factory=True,
    )
    api_key: str | None = setting(
        None, "Bearer key every request must send; required for a non-loopback bind."
    )
    keep_alive: float = setting(
        300.0, "How long an idle model stays loaded (30s, 5m, 1h; negative: forever).", shown="5m"
    )
    max_loaded_models: int = setting(2, "Models held in memory at once.")
    num_parallel: int | None = setting(
        None, "Parallel slots per model.", shown="4 for chat models, fewer when memory is short"
    )
    memory_budget_bytes: int = setting(
        0, "Memory models are planned within: weights and KV cache (0: the machine's)."
    )
    """A request's ``num_ctx`` is clamped to what fits in it and a default context sized to
    it (docs/API.md, "Context length"): for a machine shared with other work."""
    max_queue: int = setting(
        16, "Requests that may wait per model beyond its slots; one more gets 429."
    )
    max_body_bytes: int = setting(32 << 20, "Largest request body accepted (413 above).")
    allowed_origins: list[str] = setting(
        list,
        "Browser origins allowed besides the local ones (comma-separated, * wildcards).",
        env="MLXSERVE_ORIGINS",
        shown="none",
        factory=True,
    )
    allowed_hosts: list[str] = setting(
        list,
        "Host header names allowed besides local ones (comma-separated).",
        shown="none",
        factory=True,
    )
    log_level: str = setting("info", "debug, info, warning or error.")
    prompt_cache_bytes: int = setting(
        1 << 30, "Per model: bytes of KV cache kept for follow-up prompts."
    )
    """mlx-lm's LRU: the bound that keeps batching from growing memory without limit, with
    ``num_parallel`` x context for slots."""
    prompt_cache_disk_bytes: int | None = setting(
        None,
        "The prompt cache's disk tier, all models together (0: off).",
        shown="a tenth of free space, at most 16 GiB",
    )
    """``cache/prompts`` under the home (docs/STORE.md); it holds a representation of users'
    prompts, owner-only."""
    sse_keepalive_s: float = setting(
        5.0, "Seconds between SSE comment lines while a prompt is still being read."
    )
    group_step_timeout_s: float = setting(
        30.0, "With --distributed: a batch step slower than this means a rank hangs."
    )
    """Its model is then marked unavailable (docs/DISTRIBUTED.md); it must exceed the longest
    prefill."""
    webui: bool = setting(
        True,
        "Serve the chat and dashboard page at / to browsers (off: the heartbeat text).",
        shown="on",
    )
    """``GET /`` from a browser serves the page (``mlxserve/server/webui``); off
    (``--no-webui``), every client gets the heartbeat text."""
    isolate_runners: bool = setting(
        True, "Run each loaded model in its own worker process (off: in the daemon's).", shown="on"
    )
    """docs/RUNNERS.md; off, a library's abort takes the daemon down with it."""
    runner_stall_timeout_s: float = setting(
        300.0, "A worker owing an answer that sends nothing this long is killed (hung)."
    )
    """Its requests end with ``model_crashed``; it must exceed the longest prefill step."""
    runner_load_timeout_s: float = setting(
        600.0, "A worker still loading its model after this long is killed."
    )
    runner_memory_limit_bytes: int = setting(
        0, "A worker whose resident memory passes this is killed (0: no limit)."
    )

    @property
    def is_loopback(self) -> bool:
        return self.host in LOOPBACK_HOSTS

    def check(self) -> None:
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError(
                "the API key is blank: a blank key would leave the daemon open; set a real "
                "key or unset MLXSERVE_API_KEY / --api-key"
            )
        if not self.is_loopback and not self.api_key:
            raise ConfigError(
                f"binding to {self.host} exposes the daemon beyond this machine: set an API key "
                "(--api-key or MLXSERVE_API_KEY) or bind to 127.0.0.1"
            )
        if self.max_loaded_models < 1 or self.max_queue < 0:
            raise ConfigError("max_loaded_models must be >= 1 and max_queue >= 0")


SETTINGS = {spec.name: spec for spec in fields(Settings)}
ENVIRONMENT = {
    name: spec.metadata["env"] or f"MLXSERVE_{name.upper()}" for name, spec in SETTINGS.items()
}
"""``{setting: MLXSERVE_* variable}``, derived from the declaration."""
_LISTS = frozenset({"allowed_origins", "allowed_hosts"})
_DURATIONS = frozenset({"keep_alive"})


def setting_kind(name: str) -> type:
    """What a setting is written as on a command line (a duration stays text until parsed)."""
    if name in _DURATIONS:
        return str
    annotation = str(SETTINGS[name].type)
    for kind in (bool, int, float, Path):
        if annotation.startswith(kind.__name__):
            return kind
    return list if name in _LISTS else str


def _coerce(name: str, value: Any) -> Any:
    try:
        if name in _DURATIONS:
            return parse_duration(value)
        if value is None:
            return None
        if name in _LISTS:
            return (
                [v.strip() for v in value.split(",") if v.strip()]
                if isinstance(value, str)
                else list(value)
            )
        kind = setting_kind(name)
        if kind is bool:
            return value if isinstance(value, bool) else _boolean(value)
        if kind is Path:
            return Path(value).expanduser()
        if kind in (int, float):
            return kind(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for {name}: {value!r}") from exc
    return value


def shown_default(name: str) -> str:
    """The default as ``--help`` and docs/SETTINGS.md write it."""
    spec = SETTINGS[name]
    if spec.metadata["shown"] is not None:
        return str(spec.metadata["shown"])
    return "none" if spec.default is None else str(spec.default)


def flag_name(name: str) -> str:
    """``--max-queue``; a switch is ``--webui/--no-webui``."""
    flag = "--" + name.replace("_", "-")
    return f"{flag}/--no-{flag[2:]}" if setting_kind(name) is bool else flag


def setting_help(name: str) -> str:
    """One setting's ``--help`` line: what it does, its variable and its default."""
    spec = SETTINGS[name]
    return f"{spec.metadata['help']} [env {ENVIRONMENT[name]}; default: {shown_default(name)}]"


def settings_reference() -> str:
    """The Markdown table of docs/SETTINGS.md (tests/test_settings_doc.py keeps them equal)."""
    lines = [
        "| config key | environment | flag | default | meaning |",
        "|---|---|---|---|---|",
    ]
    for name, spec in SETTINGS.items():
        flag = f"`{flag_name(name)}`" if spec.metadata["flag"] else ""
        lines.append(
            f"| `{name}` | `{ENVIRONMENT[name]}` | {flag} | {shown_default(name)} "
            f"| {spec.metadata['help']} |"
        )
    return "\n".join(lines) + "\n"


_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


def _boolean(text: Any) -> bool:
    """A switch from the environment: ``1/true/yes/on`` or ``0/false/no/off``."""
    if not isinstance(text, str):
        raise TypeError(text)
    word = text.strip().lower()
    if word not in _TRUE | _FALSE:
        raise ValueError(text)
    return word in _TRUE


def split_host(value: str) -> tuple[str, int | None]:
    """``MLXSERVE_HOST`` as ``OLLAMA_HOST``: ``host``, ``host:port``, ``[::1]:port`` or a URL
    (``http://host:port``); the port is ``None`` when not given."""
    text = value.strip()
    if "://" not in text:
        text = f"//{text}"
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise ConfigError(
            f"invalid host {value!r} (examples: 127.0.0.1, 127.0.0.1:11500)"
        ) from None
    if not parts.hostname or parts.path not in ("", "/") or parts.username:
        raise ConfigError(f"invalid host {value!r} (examples: 127.0.0.1, 127.0.0.1:11500)")
    return parts.hostname, port


def _apply(settings: Settings, values: dict[str, Any], source: str) -> None:
    for key, value in values.items():
        if key not in SETTINGS:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        if key == "host" and isinstance(value, str):
            value, port = split_host(value)
            if port is not None:
                settings.port = port
        setattr(settings, key, _coerce(key, value))


def load_settings(flags: dict[str, Any] | None = None) -> Settings:
    flags = {key: value for key, value in (flags or {}).items() if value is not None}
    settings = Settings()
    home = Path(flags.get("home") or os.environ.get(HOME_ENV) or settings.home).expanduser()
    settings.home = home
    user_file = Path(os.environ.get(CONFIG_ENV) or home / "config.json")
    if user_file.is_file():
        try:
            _apply(settings, json.loads(user_file.read_text()), str(user_file))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{user_file}: not valid JSON ({exc})") from None
    _apply(
        settings,
        {k: os.environ[v] for k, v in ENVIRONMENT.items() if os.environ.get(v) is not None},
        "environment",
    )
    _apply(settings, flags, "flags")
    return settings
