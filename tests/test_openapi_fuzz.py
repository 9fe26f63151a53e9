"""schemathesis over ``schemas/openapi.yaml`` against a real daemon: no 5xx, no answer the
document does not describe (status, content type, headers, body), and no schema-valid request
refused with a 400 unless only the store's state can say so.

Bounded (``FUZZ_EXAMPLES`` cases per operation, ``MLXSERVE_FUZZ_EXAMPLES`` to change it) and
aimed at real models: half the cases that name a model name one the fixture store holds, so
generation, embedding and ``/api/show`` run for real.
"""

from __future__ import annotations

import os
from typing import Any

import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mlxserve.server.app import OPENAPI_PATH

FUZZ_EXAMPLES = int(os.environ.get("MLXSERVE_FUZZ_EXAMPLES", "60"))
REAL_MODELS = ("tiny:gguf", "tiny:mlx")
GENERATION_CAP = 8
"""Tokens a fuzzed generation may produce: the answer's shape matters here, not its length."""
SKIPPED_OPERATIONS = ("/api/pull", "/api/push")
"""They talk to a registry (none here; ``tests/test_registry.py`` runs one)."""
RENAMED_OPERATIONS = frozenset(
    {"/api/generate", "/api/chat", "/api/embed", "/api/embeddings", "/api/show",
     "/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses",
     "/v1/messages", "/v1/messages/count_tokens"}
)  # fmt: skip
"""Operations whose ``model`` may be swapped for a real one (never delete, copy or create)."""
STATE_DEPENDENT_CODES = frozenset(
    {
        "unsupported_feature",  # embeddings asked of a llama.cpp model, logprobs, ...
        "context_overflow",  # a generated prompt longer than the tiny model's context
        "context_length_exceeded",  # the same, on the OpenAI routes (OpenAI's code)
        "invalid_format",  # a generated JSON Schema no grammar engine can enforce
        "template_error",  # a conversation the model's template refuses
        "digest_mismatch",  # a blob whose bytes do not hash to the digest in the path
        "invalid_modelspec",  # a create whose template does not compile
        "invalid_import_source",  # a create from files that are not a model
    }
)
"""400 codes a schema cannot rule out: they depend on the model, the store or the bytes."""
STATE_DEPENDENT_PARAMS = frozenset(
    {
        "logit_bias",
        "num_ctx",
        "think",
        "thinking",
        "tool_choice",
        "images",
        "dimensions",
        "arguments",
    }
)
"""``invalid_request`` about these depends on the model or on another field: a token id past
the vocabulary, a context past the trained one, thinking asked of a model without it, a
named tool the request does not list, images sent to a model without vision, more dimensions
than the model's vectors have, and tool call ``arguments`` text that is not a JSON object (a
string's content is beyond what a JSON Schema here can say).
(From ``/api/create`` it can name a blob that was never uploaded.)"""


def _without_skipped(schema: Any) -> Any:
    for path in SKIPPED_OPERATIONS:
        schema = schema.exclude(path=path)
    return schema


# Loaded at import (``schemathesis.pytest.from_fixture`` reads pytest internals that pytest 9
# no longer has); the base URL is the module's daemon, given at call time.
schema = _without_skipped(schemathesis.openapi.from_path(OPENAPI_PATH))


def aim_at_real_models(case: Any) -> None:
    """Swap in a real model name for about half the cases, with a short generation."""
    body = case.body
    if case.operation.path not in RENAMED_OPERATIONS or not isinstance(body, dict):
        return
    pick = len(repr(body)) % (2 * len(REAL_MODELS))
    if pick >= len(REAL_MODELS):
        return
    body["model"] = REAL_MODELS[pick]
    if case.operation.path == "/v1/responses":
        body["max_output_tokens"] = GENERATION_CAP
    elif case.operation.path.startswith("/v1/"):
        body.pop("max_completion_tokens", None)
        body["max_tokens"] = GENERATION_CAP
    else:
        options = body.get("options")
        body["options"] = {
            **(options if isinstance(options, dict) else {}),
            "num_predict": GENERATION_CAP,
        }


def refused_only_for_state(response: Any, case: Any) -> None:
    """A schema-valid request may get a 400 only with a code the schema cannot foresee."""
    if response.status_code != 400 or case.meta is None:
        return
    if not case.meta.generation.mode.is_positive:
        return
    body = response.json()
    error = body.get("error")
    code = error.get("code") if isinstance(error, dict) else body.get("code")
    param = error.get("param") if isinstance(error, dict) else body.get("details", {}).get("param")
    state_dependent = code in STATE_DEPENDENT_CODES or (
        code == "invalid_request"
        and (case.path == "/api/create" or param in STATE_DEPENDENT_PARAMS)
    )
    assert state_dependent, (
        f"schema-valid request refused: {case.method} {case.path} {case.body!r} -> {body}"
    )


@schema.parametrize()
@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_the_daemon_answers_as_documented(case, daemon):
    aim_at_real_models(case)
    response = case.call(base_url=daemon.url, timeout=60)
    case.validate_response(
        response,
        checks=[
            schemathesis.checks.not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )
    refused_only_for_state(response, case)
