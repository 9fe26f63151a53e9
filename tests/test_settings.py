"""Daemon settings are declared once (``mlxserve/server/config.py``): the environment table, the
flags, ``mlxctl serve --help`` and docs/SETTINGS.md all follow that declaration."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from mlxserve.server.config import (
    ENVIRONMENT,
    SETTINGS,
    flag_name,
    load_settings,
    settings_reference,
    shown_default,
)

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "SETTINGS.md"
PRODUCT = ("mlxserve", "mlxctl", "modelstore")
# One value per setting, as a person would write it, and what the daemon then holds.
SAMPLES: dict[str, tuple[str, object]] = {
    "host": ("127.0.0.2", "127.0.0.2"),
    "port": ("11601", 11601),
    "home": ("/tmp/a-store", Path("/tmp/a-store")),
    "api_key": ("k", "k"),
    "keep_alive": ("10m", 600.0),
    "max_loaded_models": ("3", 3),
    "num_parallel": ("2", 2),
    "memory_budget_bytes": ("17179869184", 17179869184),
    "max_queue": ("5", 5),
    "max_body_bytes": ("1024", 1024),
    "allowed_origins": (
        "https://a.example,https://b.example",
        ["https://a.example", "https://b.example"],
    ),
    "allowed_hosts": ("a.example", ["a.example"]),
    "log_level": ("debug", "debug"),
    "prompt_cache_bytes": ("4096", 4096),
    "prompt_cache_disk_bytes": ("0", 0),
    "sse_keepalive_s": ("2.5", 2.5),
    "group_step_timeout_s": ("60", 60.0),
    "webui": ("off", False),
    "isolate_runners": ("off", False),
    "runner_stall_timeout_s": ("120", 120.0),
    "runner_load_timeout_s": ("900", 900.0),
    "runner_memory_limit_bytes": ("8589934592", 8589934592),
}


@pytest.fixture
def clean_environment(monkeypatch, tmp_path):
    for variable in [*ENVIRONMENT.values(), "MLXSERVE_CONFIG"]:
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MLXSERVE_HOME", str(tmp_path))
    return monkeypatch


def test_every_setting_has_its_own_variable_and_a_sample_here():
    assert set(SAMPLES) == set(SETTINGS), "add the new setting to SAMPLES"
    variables = list(ENVIRONMENT.values())
    assert len(set(variables)) == len(variables)
    assert all(v.startswith("MLXSERVE_") for v in variables)


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_setting_is_read_from_its_variable(clean_environment, name):
    text, expected = SAMPLES[name]
    clean_environment.setenv(ENVIRONMENT[name], text)
    assert getattr(load_settings(), name) == expected


@pytest.mark.parametrize("name", sorted(SAMPLES))
def test_each_setting_is_taken_as_a_flag(clean_environment, name):
    text, expected = SAMPLES[name]
    assert getattr(load_settings({name: text}), name) == expected


def test_the_defaults_are_the_declared_ones_as_written(clean_environment):
    settings = load_settings()
    assert settings.keep_alive == 300.0 and shown_default("keep_alive") == "5m"
    assert settings.port == 11500 and shown_default("port") == "11500"


def test_serve_help_lists_every_setting_with_its_variable_and_default():
    help_text = subprocess.run(
        [sys.executable, "-c", "from mlxctl.cli import main; main()", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": str(ROOT), "COLUMNS": "200", "PATH": "/usr/bin:/bin"},
    ).stdout
    flat = " ".join(help_text.split())
    for name in SETTINGS:
        assert all(flag in flat for flag in flag_name(name).split("/")), name
        assert f"[env {ENVIRONMENT[name]}; default: {shown_default(name)}]" in flat, name


def test_settings_doc_is_the_declaration():
    assert settings_reference() in DOC.read_text(), (
        "docs/SETTINGS.md is out of date: paste settings_reference() from "
        "mlxserve/server/config.py into it"
    )


def test_every_variable_the_product_reads_is_documented():
    documented = set(re.findall(r"MLXSERVE_[A-Z_]+", DOC.read_text()))
    read = {
        name
        for package in PRODUCT
        for path in (ROOT / package).rglob("*.py")
        for name in re.findall(r"MLXSERVE_[A-Z][A-Z_]*[A-Z]", path.read_text())
    }
    assert read - documented == set()
