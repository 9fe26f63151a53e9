"""``mlxserve/server/openapi.yaml`` stays true: a valid OpenAPI 3.1 document, every route the daemon
serves is in it and every path in it is served, every error code is listed, and real answers
of the running daemon validate against the schemas it gives."""

from __future__ import annotations

import importlib
import json
import pkgutil
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from mlxserve.server.app import OPENAPI_PATH, build_app
from mlxserve.server.config import Settings
from modelstore.errors import MlxserveError

METHODS = {"get", "post", "put", "patch", "delete", "head"}


@pytest.fixture(scope="module")
def document() -> dict[str, Any]:
    return yaml.safe_load(OPENAPI_PATH.read_text())


def served_operations(tmp_path: Path) -> set[tuple[str, str]]:
    app = build_app(Settings(home=tmp_path))
    operations = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource else ""
        operations.add((route.method.lower(), path))
    # aiohttp answers HEAD for every GET route on its own; only a HEAD of its own counts.
    return {(m, p) for m, p in operations if not (m == "head" and ("get", p) in operations)}


def documented_operations(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method, path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


def test_document_is_valid_openapi(document):
    from openapi_spec_validator import validate

    validate(document)


def test_every_route_is_documented_and_every_path_is_served(document, tmp_path):
    served, documented = served_operations(tmp_path), documented_operations(document)
    assert served - documented == set(), "routes missing from mlxserve/server/openapi.yaml"
    assert documented - served == set(), "documented routes the daemon does not serve"


def all_error_codes() -> set[str]:
    for package in ("modelstore", "mlxserve", "mlxctl"):
        root = importlib.import_module(package)
        for module in pkgutil.walk_packages(root.__path__, f"{package}."):
            if module.name.endswith(("errors", "client")) or ".registry" in module.name:
                importlib.import_module(module.name)
    codes, pending = set(), [MlxserveError]
    while pending:
        cls = pending.pop()
        codes.add(cls.code)
        pending.extend(cls.__subclasses__())
    return codes


def test_every_error_code_is_listed(document):
    listed = set(document["components"]["schemas"]["ErrorCode"]["enum"])
    assert all_error_codes() - listed == set()


def response_schema(
    document: dict[str, Any],
    method: str,
    path: str,
    status: int,
    media_type: str = "application/json",
) -> dict[str, Any]:
    response = document["paths"][path][method]["responses"][str(status)]
    if "$ref" in response:
        response = document["components"]["responses"][response["$ref"].rsplit("/", 1)[1]]
    schema = response["content"][media_type]["schema"]
    return {**schema, "components": document["components"]}


def call(daemon, method: str, path: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(
        daemon.url + path,
        data=data,
        method=method.upper(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


CASES = [
    ("get", "/api/tags", "/api/tags", None, 200),
    ("get", "/api/version", "/api/version", None, 200),
    ("get", "/api/health", "/api/health", None, 200),
    ("get", "/api/ps", "/api/ps", None, 200),
    ("post", "/api/show", "/api/show", {"model": "tiny:gguf"}, 200),
    ("post", "/api/show", "/api/show", {"model": "absent:1"}, 404),
    (
        "post",
        "/api/generate",
        "/api/generate",
        {"model": "tiny:gguf", "prompt": "hi", "stream": False, "options": {"num_predict": 3}},
        200,
    ),
    (
        "post",
        "/api/chat",
        "/api/chat",
        {
            "model": "tiny:gguf",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": False,
            "options": {"num_predict": 3},
        },
        200,
    ),
    ("post", "/api/generate", "/api/generate", {"model": "tiny:gguf", "options": 3}, 400),
    ("post", "/api/pull", "/api/pull", {"model": "no-host:1", "stream": False}, 400),
    ("get", "/v1/models", "/v1/models", None, 200),
    ("get", "/v1/models/{model}", "/v1/models/tiny:gguf", None, 200),
    ("get", "/v1/models/{model}", "/v1/models/absent:1", None, 404),
    (
        "post",
        "/v1/chat/completions",
        "/v1/chat/completions",
        {"model": "tiny:gguf", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3},
        200,
    ),
    ("post", "/v1/completions", "/v1/completions", {"model": "absent:1", "prompt": "hi"}, 404),
]


@pytest.mark.parametrize(
    ("method", "documented", "path", "body", "status"),
    CASES,
    ids=[f"{c[0]} {c[2]} {c[4]}" for c in CASES],
)
def test_real_answers_match_the_document(daemon, document, method, documented, path, body, status):
    answered, payload = call(daemon, method, path, body)
    assert answered == status, payload
    jsonschema.validate(payload, response_schema(document, method, documented, status))


def test_document_is_served(daemon):
    with urllib.request.urlopen(daemon.url + "/openapi.yaml", timeout=10) as response:
        assert response.headers["Content-Type"].startswith("application/yaml")
        assert response.read().decode() == OPENAPI_PATH.read_text()
