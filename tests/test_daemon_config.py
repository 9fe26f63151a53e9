"""Settings precedence: the declared defaults < user file < environment < flags."""

from __future__ import annotations

import json

import pytest

from mlxserve.server.config import ConfigError, Settings, load_settings, parse_duration


def test_defaults_come_from_the_committed_file(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    settings = load_settings()
    assert (settings.host, settings.port, settings.keep_alive) == ("127.0.0.1", 11500, 300.0)


def test_user_file_then_environment_then_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    (tmp_path / "config.json").write_text(
        json.dumps({"port": 1, "max_queue": 3, "keep_alive": "1m"})
    )
    monkeypatch.setenv("MLXSERVE_PORT", "2")
    monkeypatch.setenv("MLXSERVE_ORIGINS", "https://a.example, https://b.example")
    settings = load_settings({"port": 3})
    assert settings.port == 3
    assert settings.max_queue == 3
    assert settings.keep_alive == 60.0
    assert settings.allowed_origins == ["https://a.example", "https://b.example"]
    assert load_settings().port == 2


def test_unknown_settings_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({"prot": 1}))
    with pytest.raises(ConfigError):
        load_settings()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("5m", 300), ("1h30m", 5400), ("30s", 30), (-1, -1), ("0", 0), (2.5, 2.5), ("250ms", 0.25)],
)
def test_durations_parse_like_ollama(text, seconds):
    assert parse_duration(text) == seconds


def test_a_public_bind_needs_an_api_key():
    with pytest.raises(ConfigError):
        Settings(host="0.0.0.0").check()
    Settings(host="0.0.0.0", api_key="k").check()
