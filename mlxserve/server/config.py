"""Daemon settings: ``config/config.json`` < user config file < environment < flags.

The defaults file is committed and documented; a user file (``$MLXSERVE_HOME/config.json`` or
``$MLXSERVE_CONFIG``) overrides it, then ``MLXSERVE_*`` environment variables, then flags.
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

DEFAULTS_PATH = Path(__file__).resolve().parents[2] / "config" / "config.json"
DEFAULT_PORT = 11500
"""Not Ollama's 11434, so both can run side by side."""
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "::1", "localhost"})
ENVIRONMENT = {
    "host": "MLXSERVE_HOST",
    "port": "MLXSERVE_PORT",
    "api_key": "MLXSERVE_API_KEY",
    "keep_alive": "MLXSERVE_KEEP_ALIVE",
    "max_loaded_models": "MLXSERVE_MAX_LOADED_MODELS",
    "num_parallel": "MLXSERVE_NUM_PARALLEL",
    "max_queue": "MLXSERVE_MAX_QUEUE",
    "max_body_bytes": "MLXSERVE_MAX_BODY_BYTES",
    "allowed_origins": "MLXSERVE_ORIGINS",
    "allowed_hosts": "MLXSERVE_ALLOWED_HOSTS",
    "log_level": "MLXSERVE_LOG_LEVEL",
    "sse_keepalive_s": "MLXSERVE_SSE_KEEPALIVE_S",
    "prompt_cache_bytes": "MLXSERVE_PROMPT_CACHE_BYTES",
    "prompt_cache_disk_bytes": "MLXSERVE_PROMPT_CACHE_DISK_BYTES",
    "group_step_timeout_s": "MLXSERVE_GROUP_STEP_TIMEOUT_S",
    "webui": "MLXSERVE_WEBUI",
}


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


@dataclass
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    home: Path = field(default_factory=default_root)
    api_key: str | None = None
    keep_alive: float = 300.0
    max_loaded_models: int = 2
    num_parallel: int | None = None
    """Parallel slots per model; default: what the runner can serve (MLX batches 4)."""
    max_queue: int = 16
    """Requests that may wait per model beyond its slots; one more gets 429."""
    max_body_bytes: int = 32 << 20
    allowed_origins: list[str] = field(default_factory=list)
    allowed_hosts: list[str] = field(default_factory=list)
    log_level: str = "info"
    prompt_cache_bytes: int = 1 << 30
    """Per model: KV caches kept for follow-up prompts (mlx-lm's LRU); the bound that keeps
    batching from growing memory without limit, with ``num_parallel`` x context for slots."""
    prompt_cache_disk_bytes: int | None = None
    """The prompt cache's disk tier, for every model together (``cache/prompts`` under the
    home): ``None`` sizes it from free space (a tenth, at most 16 GiB); 0 keeps it off."""
    sse_keepalive_s: float = 5.0
    """How often an SSE stream sends a comment line while the prompt is still being read."""
    group_step_timeout_s: float = 30.0
    """With ``--distributed``: a batch step (a long prefill included) that takes longer means a
    rank hangs; its model is then marked unavailable (docs/DISTRIBUTED.md)."""
    webui: bool = True
    """``GET /`` from a browser serves the chat and dashboard page (``mlxserve/server/webui``);
    off (``--no-webui``), every client gets the heartbeat text."""

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


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in fields(Settings)}
    kind = kinds[name]
    try:
        if name == "keep_alive":
            return parse_duration(value)
        if name == "home":
            return Path(value).expanduser()
        if value is None:
            return None
        if name in {"allowed_origins", "allowed_hosts"}:
            return (
                [v.strip() for v in value.split(",") if v.strip()]
                if isinstance(value, str)
                else list(value)
            )
        if kind == "bool":
            return value if isinstance(value, bool) else _boolean(value)
        if "int" in str(kind):
            return int(value)
        if "float" in str(kind):
            return float(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"invalid value for {name}: {value!r}") from exc
    return value


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
    known = {f.name for f in fields(Settings)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown setting {key!r}")
        if key == "host" and isinstance(value, str):
            value, port = split_host(value)
            if port is not None:
                settings.port = port
        setattr(settings, key, _coerce(key, value))


def load_settings(flags: dict[str, Any] | None = None) -> Settings:
    settings = Settings()
    if DEFAULTS_PATH.is_file():
        _apply(settings, json.loads(DEFAULTS_PATH.read_text()), str(DEFAULTS_PATH))
    home = Path(os.environ.get(HOME_ENV) or settings.home).expanduser()
    settings.home = home
    user_file = Path(os.environ.get("MLXSERVE_CONFIG") or home / "config.json")
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
    _apply(settings, {k: v for k, v in (flags or {}).items() if v is not None}, "flags")
    return settings
