"""What the native (Ollama-compatible) wire format shares across the daemon's modules.

The chat lines themselves are built by their translator (``mlxserve/server/api_native.py``),
which ``mlxctl run --json`` uses too, so the CLI prints exactly what the daemon sends.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utc_timestamp(at: float | None = None) -> str:
    """RFC 3339 in UTC, like Ollama's ``created_at``: now, or ``at`` (seconds since the epoch)."""
    moment = datetime.now(UTC) if at is None else datetime.fromtimestamp(at, UTC)
    return moment.isoformat().replace("+00:00", "Z")
