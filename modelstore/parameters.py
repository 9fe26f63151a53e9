"""The sampling parameters, declared once: every other name for them is derived from here.

A ModelSpec's ``parameters``, Ollama's ``options``, OpenAI's, the Responses API's and
Anthropic's request fields, ``mlxctl run``'s flags and the runner's ``GenerateRequest`` all
name the same knobs; each field below says what each of them calls it (``metadata``), so a
translator never keeps its own table. It lives in ``modelstore`` (the lowest layer) because the
ModelSpec is where a model's defaults are written down; it imports nothing.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any, Literal

Api = Literal["ollama", "openai", "responses", "anthropic"]


def _names(
    *,
    ollama: str | None = None,
    openai: tuple[str, ...] = (),
    responses: tuple[str, ...] = (),
    anthropic: str | None = None,
    cli: bool = False,
    spec: bool = True,
    kind: type = float,
) -> dict[str, Any]:
    return {
        "ollama": (ollama,) if ollama else (),
        "openai": openai,
        "responses": responses,
        "anthropic": (anthropic,) if anthropic else (),
        "cli": cli,
        "spec": spec,
        "kind": kind,
    }


@dataclass
class Sampling:
    """How to pick each next token; a request overrides the ModelSpec's defaults field by field."""

    temperature: float = field(
        default=0.8,
        metadata=_names(
            ollama="temperature",
            openai=("temperature",),
            responses=("temperature",),
            anthropic="temperature",
            cli=True,
        ),
    )
    top_p: float = field(
        default=1.0,
        metadata=_names(
            ollama="top_p", openai=("top_p",), responses=("top_p",), anthropic="top_p", cli=True
        ),
    )
    top_k: int = field(
        default=0,
        metadata=_names(ollama="top_k", openai=("top_k",), anthropic="top_k", cli=True, kind=int),
    )
    min_p: float = field(default=0.0, metadata=_names(ollama="min_p", openai=("min_p",), cli=True))
    repetition_penalty: float = field(
        default=1.0,
        metadata=_names(ollama="repeat_penalty", openai=("repetition_penalty",), cli=True),
    )
    repetition_context_size: int = field(
        default=64, metadata=_names(ollama="repeat_last_n", kind=int)
    )
    presence_penalty: float = field(
        default=0.0,
        metadata=_names(ollama="presence_penalty", openai=("presence_penalty",), cli=True),
    )
    frequency_penalty: float = field(
        default=0.0,
        metadata=_names(ollama="frequency_penalty", openai=("frequency_penalty",), cli=True),
    )
    seed: int | None = field(
        default=None,
        metadata=_names(ollama="seed", openai=("seed",), cli=True, kind=int),
    )
    max_tokens: int | None = field(
        default=None,
        metadata=_names(
            ollama="num_predict",
            openai=("max_completion_tokens", "max_tokens"),
            responses=("max_output_tokens",),
            anthropic="max_tokens",
            cli=True,
            kind=int,
        ),
    )
    stop: list[str] = field(
        default_factory=list,
        metadata=_names(ollama="stop", openai=("stop",), anthropic="stop_sequences", kind=list),
    )
    logit_bias: dict[int, float] = field(
        default_factory=dict, metadata=_names(openai=("logit_bias",), spec=False, kind=dict)
    )


SAMPLING_FIELDS = tuple(f.name for f in fields(Sampling))
SPEC_PARAMETERS = tuple(f.name for f in fields(Sampling) if f.metadata["spec"])
"""The sampling parameters a ModelSpec may set as a model's defaults."""
CLI_PARAMETERS = tuple(f.name for f in fields(Sampling) if f.metadata["cli"])


def api_names(api: Api) -> dict[str, tuple[str, type]]:
    """``{wire name: (field name, kind)}`` for one API (several wire names may map to a field;
    the first listed wins when a request sends more than one)."""
    table: dict[str, tuple[str, type]] = {}
    for spec in fields(Sampling):
        for wire in spec.metadata[api]:
            table[wire] = (spec.name, spec.metadata["kind"])
    return table


def kind_of(name: str) -> type:
    return next(f.metadata["kind"] for f in fields(Sampling) if f.name == name)
