"""The sampling parameters are declared once (``modelstore/parameters.py``); every other name for
them comes from there, so an API, the ModelSpec, the CLI and the runner cannot drift apart."""

from __future__ import annotations

import json
from dataclasses import fields
from pathlib import Path

import pytest

from mlxserve.errors import InvalidRequestError
from mlxserve.runners.base import GenerateRequest
from mlxserve.server import validate
from modelstore.model import RUNNER_PARAMETERS
from modelstore.parameters import (
    CLI_PARAMETERS,
    SPEC_PARAMETERS,
    UNLIMITED_TOKENS,
    Sampling,
    api_names,
)

SCHEMA = Path(__file__).resolve().parents[1] / "modelstore" / "data" / "modelspec.schema.json"


def test_the_modelspec_schema_lists_exactly_the_spec_parameters():
    schema = json.loads(SCHEMA.read_text())
    listed = set(schema["properties"]["parameters"]["properties"])
    assert listed == set(SPEC_PARAMETERS) | set(RUNNER_PARAMETERS)


def test_the_runner_request_has_every_sampling_field():
    assert {f.name for f in fields(Sampling)} <= {f.name for f in fields(GenerateRequest)}


@pytest.mark.parametrize("api", ["ollama", "openai", "responses", "anthropic"])
def test_every_api_name_maps_onto_a_sampling_field(api):
    names = {f.name for f in fields(Sampling)}
    assert {target for target, _ in api_names(api).values()} <= names


@pytest.mark.parametrize(
    ("api", "body", "expected"),
    [
        (
            "ollama",
            {"num_predict": 5, "repeat_penalty": 1.1, "repeat_last_n": 32},
            {"max_tokens": 5, "repetition_penalty": 1.1, "repetition_context_size": 32},
        ),
        (
            "openai",
            {"max_completion_tokens": 7, "max_tokens": 9, "stop": "x"},
            {"max_tokens": 7, "stop": ["x"]},
        ),
        (
            "responses",
            {"max_output_tokens": 3, "temperature": 0},
            {"max_tokens": 3, "temperature": 0.0},
        ),
        (
            "anthropic",
            {"max_tokens": 4, "stop_sequences": ["END"], "top_k": 2},
            {"max_tokens": 4, "stop": ["END"], "top_k": 2},
        ),
    ],
)
def test_each_api_names_the_same_knobs_its_own_way(api, body, expected):
    assert validate.sampling(body, api) == expected


def test_num_predict_minus_one_means_unlimited_and_zero_is_refused():
    assert validate.sampling({"num_predict": -1}, "ollama") == {"max_tokens": UNLIMITED_TOKENS}
    with pytest.raises(InvalidRequestError) as caught:
        validate.sampling({"num_predict": 0}, "ollama")
    assert caught.value.details["param"] == "num_predict"


def test_a_wrong_type_names_the_wire_field():
    with pytest.raises(InvalidRequestError) as caught:
        validate.sampling({"temperature": "hot"}, "openai")
    assert caught.value.details["param"] == "temperature"


def test_the_cli_offers_a_flag_per_cli_parameter():
    from click.testing import CliRunner

    from mlxctl.run_command import run_command

    help_text = CliRunner().invoke(run_command, ["--help"]).output
    for name in CLI_PARAMETERS:
        assert f"--{name.replace('_', '-')}" in help_text
