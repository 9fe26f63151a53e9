"""Each sampling parameter's bound lives once, in ``modelstore/parameters.py``: every door refuses
the same values with the same words (the name the caller wrote, the bound, the value), the
ModelSpec schema and the OpenAPI document say the same bounds, and values at the edges still
run on both runners (docs/API.md, "Sampling parameters")."""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml

from mlxctl.cli import cli
from mlxctl.errors import run_cli
from mlxctl.repl import PARAMETERS as REPL_PARAMETERS
from mlxctl.repl import Repl
from mlxctl.run_command import ChatState
from mlxserve.server.app import OPENAPI_PATH
from modelstore.parameters import (
    CLI_PARAMETERS,
    MAX_CONTEXT_LENGTH,
    SPEC_PARAMETERS,
    UNBOUNDED,
    Sampling,
    api_names,
    bound_of,
)
from modelstore.spec import SCHEMA_PATH

HI = [{"role": "user", "content": "Hi"}]

# (field, an out-of-range value, what every door says after the name)
OUT_OF_RANGE: list[tuple[str, Any, str]] = [
    ("temperature", -0.5, "must be at least 0, not -0.5"),
    ("top_p", -0.1, "must be between 0 and 1, not -0.1"),
    ("top_p", 5, "must be between 0 and 1, not 5"),
    ("top_k", -1, "must be at least 0, not -1"),
    ("min_p", 1.5, "must be between 0 and 1, not 1.5"),
    ("repetition_penalty", 0, "must be greater than 0, not 0"),
    ("repetition_context_size", -2, f"must be between 0 and {MAX_CONTEXT_LENGTH}, not -2"),
    (
        "repetition_context_size",
        MAX_CONTEXT_LENGTH + 1,
        f"must be between 0 and {MAX_CONTEXT_LENGTH}, not {MAX_CONTEXT_LENGTH + 1}",
    ),
    ("presence_penalty", 2.5, "must be between -2 and 2, not 2.5"),
    ("frequency_penalty", -3, "must be between -2 and 2, not -3"),
    ("seed", -1, "must be between 0 and 4294967295, not -1"),
    ("seed", 2**32, "must be between 0 and 4294967295, not 4294967296"),
    ("max_tokens", 0, "must be at least 1, not 0"),
    ("logit_bias", {"100": 500}, "values must be between -100 and 100, not 500"),
]
BOUNDED = {f.name for f in fields(Sampling) if f.metadata["bound"] != UNBOUNDED}

PATH_API = {
    "/api/chat": "ollama",
    "/api/generate": "ollama",
    "/v1/chat/completions": "openai",
    "/v1/completions": "openai",
    "/v1/responses": "responses",
    "/v1/messages": "anthropic",
}
SPEC_DOORS = ("mlxctl spec validate", "/api/create")
CLI_DOORS = ("mlxctl run --flag", "/set parameter")


def door_name(door: str, field: str) -> str | None:
    """The name ``door`` gives ``field`` (the first an API lists: ``max_completion_tokens`` for
    OpenAI chat), or ``None`` where it takes no such parameter."""
    if door in PATH_API:
        names = api_names(PATH_API[door])  # type: ignore[arg-type]
        return next((wire for wire, (name, _) in names.items() if name == field), None)
    if door in SPEC_DOORS:
        return field if field in SPEC_PARAMETERS else None
    if door == "mlxctl run --flag":
        return f"--{field.replace('_', '-')}" if field in CLI_PARAMETERS else None
    return field if field in REPL_PARAMETERS else None


CASES = [
    pytest.param(door, name, field, value, said, id=f"{door} {name}={value}")
    for door in (*PATH_API, *SPEC_DOORS, *CLI_DOORS)
    for field, value, said in OUT_OF_RANGE
    if (name := door_name(door, field))
]


def post(url: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read().splitlines()[-1])
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def api_body(path: str, wire: str, value: Any) -> dict[str, Any]:
    model = {"model": "tiny:gguf", "stream": False}
    return {
        "/api/chat": {**model, "messages": HI, "options": {wire: value}},
        "/api/generate": {**model, "prompt": "Hi", "options": {wire: value}},
        "/v1/chat/completions": {**model, "messages": HI, wire: value},
        "/v1/completions": {**model, "prompt": "Hi", wire: value},
        "/v1/responses": {**model, "input": "Hi", wire: value},
        "/v1/messages": {**model, "max_tokens": 4, "messages": HI, wire: value},
        "/api/create": {"model": "bounds:1", "from": "tiny:gguf", "parameters": {wire: value}},
    }[path]


def refusal(body: dict[str, Any]) -> tuple[str, str]:
    """``(code, message)`` out of any API's error shape (docs/API.md, "Errors")."""
    error = body["error"]
    if isinstance(error, dict):
        return error["code"], error["message"]
    return body["code"], error


def cli_refusal(argv: list[str], capsys: pytest.CaptureFixture[str], monkeypatch) -> str:
    """What ``mlxctl`` prints on stderr for ``argv`` (``run_cli``: one line with the code)."""
    monkeypatch.setattr(sys, "argv", ["mlxctl", *argv])
    capsys.readouterr()
    assert run_cli(cli) != 0
    return capsys.readouterr().err


def repl_answer(line: str, capsys: pytest.CaptureFixture[str]) -> str:
    state = ChatState({})
    repl = Repl(None, state, open_session=None, details=None, save=None, turn=None)  # type: ignore[arg-type]
    capsys.readouterr()
    repl.command(line)
    assert state.overrides == {}, "an out-of-range value was kept"
    return capsys.readouterr().out


@pytest.fixture(scope="module")
def spec_folder(tmp_path_factory, tiny_models) -> Path:
    folder = tmp_path_factory.mktemp("bounds-spec")
    (folder / "tiny.gguf").symlink_to(tiny_models.gguf_path)
    return folder


def test_the_table_covers_every_bounded_parameter():
    assert {field for field, _, _ in OUT_OF_RANGE} == BOUNDED


@pytest.mark.parametrize(("door", "name", "field", "value", "said"), CASES)
def test_every_door_refuses_an_out_of_range_value_in_the_same_words(
    daemon, spec_folder, capsys, monkeypatch, door, name, field, value, said
):
    expected = f"'{name}' {said}"
    if door in PATH_API:
        status, body = post(daemon.url + door, api_body(door, name, value))
        assert (status, *refusal(body)) == (400, "invalid_request", expected), body
        if isinstance(body["error"], dict):
            assert body["error"]["param"] == name
    elif door == "mlxctl spec validate":
        spec = spec_folder / f"{field}.yaml"
        spec.write_text(yaml.safe_dump({"from": "tiny.gguf", "parameters": {field: value}}))
        monkeypatch.setattr(sys, "argv", ["mlxctl", "spec", "validate", "--json", str(spec)])
        capsys.readouterr()
        with pytest.raises(SystemExit):
            run_cli(cli)
        errors = json.loads(capsys.readouterr().out)["errors"]
        assert [(e["pointer"], e["message"]) for e in errors] == [
            (f"/parameters/{field}", expected)
        ]
    elif door == "/api/create":
        status, body = post(daemon.url + door, {**api_body(door, name, value), "stream": False})
        code, message = refusal(body)
        assert (status, code) == (400, "invalid_modelspec"), body
        assert f"/parameters/{field}: {expected}" in message
    elif door == "mlxctl run --flag":
        err = cli_refusal(["run", f"{name}={value}", "tiny:gguf", "Hi"], capsys, monkeypatch)
        assert err.strip() == f"Error [invalid_request]: {expected}"
    else:
        answer = repl_answer(f"/set parameter {name} {value}", capsys)
        assert answer.strip() == f"Couldn't set parameter: {expected}"


def test_nan_and_infinity_are_out_of_every_range(spec_folder, capsys, monkeypatch):
    """JSON has neither (the body parser refuses them, tests/test_limits.py); YAML and a flag
    can spell them."""
    spec = spec_folder / "nan.yaml"
    spec.write_text("from: tiny.gguf\nparameters:\n  temperature: .nan\n  top_p: .inf\n")
    monkeypatch.setattr(sys, "argv", ["mlxctl", "spec", "validate", "--json", str(spec)])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        run_cli(cli)
    messages = [e["message"] for e in json.loads(capsys.readouterr().out)["errors"]]
    assert messages == [
        "'temperature' must be at least 0, not nan",
        "'top_p' must be between 0 and 1, not inf",
    ]
    err = cli_refusal(["run", "--temperature=nan", "tiny:gguf", "Hi"], capsys, monkeypatch)
    assert err.strip() == "Error [invalid_request]: '--temperature' must be at least 0, not nan"


# Values at the edges, and Ollama's own spellings, accepted and run.
IN_RANGE: list[tuple[str, dict[str, Any]]] = [
    ("/api/chat", {"options": {"temperature": 7, "top_p": 0, "repeat_last_n": -1}}),
    ("/api/chat", {"options": {"top_p": 1, "top_k": 10**6, "repeat_last_n": 0, "seed": 2**32 - 1}}),
    ("/api/generate", {"options": {"min_p": 1, "repeat_penalty": 2, "presence_penalty": -2}}),
    ("/v1/chat/completions", {"temperature": 0, "frequency_penalty": 2, "logit_bias": {"5": -100}}),
    ("/v1/responses", {"top_p": 0, "temperature": 1.5}),
    ("/v1/messages", {"top_k": 0, "top_p": 1}),
]


@pytest.mark.parametrize("model", ["tiny:gguf", "tiny:mlx"])
@pytest.mark.parametrize(("path", "extra"), IN_RANGE, ids=[json.dumps(e) for _, e in IN_RANGE])
def test_values_at_the_edges_run_on_both_runners(daemon, model, path, extra):
    body = {**api_body(path, "stream", False), **extra, "model": model}
    if path.startswith("/api/"):
        body["options"] = {**extra["options"], "num_predict": 2}
    elif path == "/v1/responses":
        body["max_output_tokens"] = 2
    else:
        body["max_tokens"] = 2
    status, answer = post(daemon.url + path, body)
    assert status == 200, answer


def schema_bound(prop: dict[str, Any]) -> tuple[Any, Any, Any]:
    return prop.get("minimum"), prop.get("maximum"), prop.get("exclusiveMinimum")


def metadata_bound(field: str) -> tuple[Any, Any, Any]:
    bound = bound_of(field)
    if bound.exclusive_minimum:
        return None, bound.maximum, bound.minimum
    return bound.minimum, bound.maximum, None


def test_the_modelspec_schema_says_the_same_bounds():
    properties = json.loads(SCHEMA_PATH.read_text())["properties"]["parameters"]["properties"]
    for field in SPEC_PARAMETERS:
        prop = properties[field]
        if field == "stop":
            continue
        assert schema_bound(prop) == metadata_bound(field), field
        kind = {f.name: f.metadata["kind"] for f in fields(Sampling)}[field]
        assert prop["type"] == ("integer" if kind is int else "number"), field


OPENAPI_SCHEMAS = {
    "ollama": "Options",
    "openai": "OpenAISampling",
    "responses": "ResponsesRequest",
    "anthropic": "AnthropicCountRequest",
}
OLLAMA_SPELLINGS = {
    "num_predict": {"type": "integer", "not": {"const": 0}},
    "repeat_last_n": (-1, MAX_CONTEXT_LENGTH, None),
}
"""Ollama's special values (``parameters.from_ollama``) widen two of its ranges."""


@pytest.mark.parametrize("api", list(OPENAPI_SCHEMAS))
def test_the_openapi_document_names_every_parameter_with_the_same_bounds(api):
    schemas = yaml.safe_load(OPENAPI_PATH.read_text())["components"]["schemas"]
    properties = schemas[OPENAPI_SCHEMAS[api]]["properties"]
    for wire, (field, _) in api_names(api).items():
        prop = properties[wire]
        if field == "stop":
            continue
        if field == "logit_bias":
            prop = prop["additionalProperties"]
        if api == "ollama" and wire == "num_predict":
            assert {k: prop[k] for k in ("type", "not")} == OLLAMA_SPELLINGS[wire]
        elif api == "ollama" and wire in OLLAMA_SPELLINGS:
            assert schema_bound(prop) == OLLAMA_SPELLINGS[wire], wire
        else:
            assert schema_bound(prop) == metadata_bound(field), (api, wire)
