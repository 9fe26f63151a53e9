"""The sampling parameters, declared once: every other name for them is derived from here.

A ModelSpec's ``parameters``, Ollama's ``options``, OpenAI's, the Responses API's and
Anthropic's request fields, ``mlxctl run``'s flags and the runner's ``GenerateRequest`` all
name the same knobs; each field below says what each of them calls it (``metadata``), so a
translator never keeps its own table, and which values it takes (``Bound``), so every door
refuses the same values with the same message through ``check``: the APIs
(``mlxserve/server/validate.py``), the ModelSpec (``modelstore/spec.py``), ``mlxctl run``'s flags
and ``/set parameter``, and ``build_request`` for a stored model's defaults. A runner never sees
an out-of-range value, so none clamps one. ``tests/test_bounds.py`` holds the ModelSpec schema
and ``openapi.yaml`` to these bounds. The rule for choosing them is in docs/API.md
("Sampling parameters"). It lives in ``modelstore`` (the lowest layer) because the ModelSpec is
where a model's defaults are written down; it imports only the error hierarchy.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Any, Literal

from modelstore.errors import InvalidRequestError

Api = Literal["ollama", "openai", "responses", "anthropic"]

MAX_CONTEXT_LENGTH = 1 << 24
"""``num_ctx`` / a ModelSpec's ``context_length``: 16M tokens, past every released model
(``mlxserve/server/limits.py`` enforces it); also the widest ``repeat_last_n`` window."""
MAX_SEED = 2**32 - 1
"""llama.cpp seeds are 32-bit; MLX keys refuse negative ones."""
UNLIMITED_TOKENS = 1 << 30
"""Ollama's ``num_predict: -1`` (and -2): as many as the context allows; the runner caps it."""


@dataclass(frozen=True)
class Bound:
    """The values a numeric parameter takes, in JSON Schema's terms (so the ModelSpec schema
    and the OpenAPI document can be compared with it); ``None`` is no bound on that side."""

    minimum: float | None = None
    maximum: float | None = None
    exclusive_minimum: bool = False

    def admits(self, value: float) -> bool:
        if isinstance(value, float) and not math.isfinite(value):
            return False  # a ModelSpec's ``.nan`` or ``--temperature inf``; JSON has neither
        if self.minimum is not None and (
            value <= self.minimum if self.exclusive_minimum else value < self.minimum
        ):
            return False
        return self.maximum is None or value <= self.maximum

    def __str__(self) -> str:
        """The bound in the words of every refusal (each bounded field has a minimum)."""
        low = "greater than" if self.exclusive_minimum else "at least"
        if self.maximum is None:
            return f"{low} {_number(self.minimum)}"
        if self.exclusive_minimum:
            return f"greater than {_number(self.minimum)} and at most {_number(self.maximum)}"
        return f"between {_number(self.minimum)} and {_number(self.maximum)}"


def _number(value: Any) -> str:
    """A number as a person writes it: ``4294967295`` (not ``4.29497e+09``), ``5`` for ``5.0``
    (a flag's float), ``-0.5``, ``nan``; an integer too long to print whole is cut."""
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        value = int(value)
    if isinstance(value, float):
        return repr(value)
    try:
        text = str(value)
    except ValueError:  # past Python's digit limit for printing an int
        return "an integer of thousands of digits"
    return text if len(text) <= 40 else f"{text[:20]}...({len(text)} digits)"


UNBOUNDED = Bound()


def _names(
    *,
    ollama: str | None = None,
    openai: tuple[str, ...] = (),
    responses: tuple[str, ...] = (),
    anthropic: str | None = None,
    cli: bool = False,
    spec: bool = True,
    kind: type = float,
    bound: Bound = UNBOUNDED,
) -> dict[str, Any]:
    return {
        "bound": bound,
        "ollama": (ollama,) if ollama else (),
        "openai": openai,
        "responses": responses,
        "anthropic": (anthropic,) if anthropic else (),
        "cli": cli,
        "spec": spec,
        "kind": kind,
    }


def _everywhere(name: str, bound: Bound) -> dict[str, Any]:
    """A knob every API and the CLI call by the one name."""
    return _names(
        ollama=name, openai=(name,), responses=(name,), anthropic=name, cli=True, bound=bound
    )


def _additive_penalty(name: str) -> dict[str, Any]:
    """OpenAI's two penalties, which Ollama names alike, bounded as OpenAI bounds them."""
    return _names(ollama=name, openai=(name,), cli=True, bound=Bound(-2, 2))


@dataclass
class Sampling:
    """How to pick each next token; a request overrides the ModelSpec's defaults field by field."""

    temperature: float = field(default=0.8, metadata=_everywhere("temperature", Bound(0)))
    top_p: float = field(default=1.0, metadata=_everywhere("top_p", Bound(0, 1)))
    top_k: int = field(
        default=0,
        metadata=_names(
            ollama="top_k",
            openai=("top_k",),
            anthropic="top_k",
            cli=True,
            kind=int,
            bound=Bound(0),
        ),
    )
    min_p: float = field(
        default=0.0,
        metadata=_names(ollama="min_p", openai=("min_p",), cli=True, bound=Bound(0, 1)),
    )
    repetition_penalty: float = field(
        default=1.0,
        metadata=_names(
            ollama="repeat_penalty",
            openai=("repetition_penalty",),
            cli=True,
            bound=Bound(0, exclusive_minimum=True),
        ),
    )
    repetition_context_size: int = field(
        default=64,
        metadata=_names(ollama="repeat_last_n", kind=int, bound=Bound(0, MAX_CONTEXT_LENGTH)),
    )
    presence_penalty: float = field(default=0.0, metadata=_additive_penalty("presence_penalty"))
    frequency_penalty: float = field(default=0.0, metadata=_additive_penalty("frequency_penalty"))
    seed: int | None = field(
        default=None,
        metadata=_names(
            ollama="seed", openai=("seed",), cli=True, kind=int, bound=Bound(0, MAX_SEED)
        ),
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
            bound=Bound(1),
        ),
    )
    stop: list[str] = field(
        default_factory=list,
        metadata=_names(ollama="stop", openai=("stop",), anthropic="stop_sequences", kind=list),
    )
    logit_bias: dict[int, float] = field(
        default_factory=dict,
        metadata=_names(openai=("logit_bias",), spec=False, kind=dict, bound=Bound(-100, 100)),
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


def bound_of(name: str) -> Bound:
    return next(f.metadata["bound"] for f in fields(Sampling) if f.name == name)


def out_of_range(name: str, value: Any, wire: str | None = None) -> str | None:
    """Why ``value`` lies outside field ``name``'s bound, in the words every door uses (naming
    ``wire``, the name the caller wrote), or ``None``. Types are each door's own check (a JSON
    body, YAML, a flag); a value of another type passes here."""
    bound, label = bound_of(name), wire or name
    if isinstance(value, dict):  # logit_bias: the bound is on each bias
        for bias in value.values():
            if _numeric(bias) and not bound.admits(bias):
                return f"'{label}' values must be {bound}, not {_number(bias)}"
        return None
    if not _numeric(value) or bound.admits(value):
        return None
    return f"'{label}' must be {bound}, not {_number(value)}"


def check(name: str, value: Any, wire: str | None = None) -> Any:
    """``value``, or a 400 ``invalid_request`` naming the parameter and its bound."""
    problem = out_of_range(name, value, wire)
    if problem:
        raise InvalidRequestError(problem, param=wire or name)
    return value


def _numeric(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def from_ollama(name: str, value: Any) -> Any:
    """Ollama's special values, in our terms, before ``check``: a negative ``num_predict`` is
    as many tokens as the context allows, ``repeat_last_n: -1`` the whole context (a window
    as wide as the widest context; a runner's own context is the real edge)."""
    if name == "max_tokens" and _numeric(value) and value < 0:
        return UNLIMITED_TOKENS
    if name == "repetition_context_size" and value == -1:
        return MAX_CONTEXT_LENGTH
    return value
