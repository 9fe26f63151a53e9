"""A chat template for a model that ships none, inferred from what the model is.

A base GGUF or an HF folder without a template used to get ChatML silently, without BOS, and
answered garbage (a Gemma rendered as ``<|im_start|>user``). A model's special tokens say which
turn format it was trained on (Gemma's ``<start_of_turn>``, Llama 3's header tokens, Mistral's
``[INST]``, ChatML's ``<|im_start|>``), so the import picks the family's template from its
vocabulary (the architecture breaks ties), writes ``{{ bos_token }}`` into it exactly when the
tokenizer adds BOS, stores it as the model's chat-template layer and records that it was
inferred (``ModelConfig.template_source``) so ``show`` can say so.

No library does this for templates that are absent (transformers and llama.cpp only apply the
template a model ships; llama.cpp's built-in list is keyed by template text, not by vocabulary),
hence the small table here. Pure Python: ``modelstore`` never imports the inference package.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

BOS: Final = "{{ bos_token }}"

_SYSTEM_INTO_FIRST_USER: Final = (
    "{% if messages and messages[0]['role'] == 'system' %}"
    "{% set system_prefix = (messages[0]['content'] or '') + '\\n\\n' %}"
    "{% set turns = messages[1:] %}"
    "{% else %}{% set system_prefix = '' %}{% set turns = messages %}{% endif %}"
)
"""Gemma and Mistral have no system turn: their own templates prepend it to the first user
message, and so do ours."""

GEMMA: Final = (
    _SYSTEM_INTO_FIRST_USER + "{% for message in turns %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + (system_prefix if loop.first else '') "
    "+ (message['content'] or '') | trim + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)
LLAMA3: Final = (
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ (message['content'] or '') | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
    "{% endif %}"
)
MISTRAL: Final = (
    _SYSTEM_INTO_FIRST_USER + "{% for message in turns %}"
    "{% if message['role'] == 'assistant' %}{{ (message['content'] or '') + eos_token }}"
    "{% else %}{{ '[INST] ' + (system_prefix if loop.first else '') "
    "+ (message['content'] or '') + ' [/INST]' }}{% endif %}"
    "{% endfor %}"
)
PHI3: Final = (
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + (message['content'] or '') + '<|end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
CHATML: Final = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + (message['content'] or '') "
    "+ '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@dataclass(frozen=True)
class Family:
    name: str
    markers: frozenset[str]
    """Tokens that must all be in the vocabulary for this format."""
    architectures: frozenset[str]
    """Architectures whose models use this format even when a marker is not one token
    (Mistral v0.1's ``[INST]`` is plain text in its vocabulary)."""
    template: str


FAMILIES: Final = (
    Family(
        "gemma",
        frozenset({"<start_of_turn>", "<end_of_turn>"}),
        frozenset({"gemma", "gemma2", "gemma3", "gemma3_text"}),
        GEMMA,
    ),
    Family(
        "llama3",
        frozenset({"<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"}),
        frozenset(),
        LLAMA3,
    ),
    Family("mistral", frozenset({"[INST]", "[/INST]"}), frozenset({"mistral", "mixtral"}), MISTRAL),
    Family("phi3", frozenset({"<|user|>", "<|assistant|>", "<|end|>"}), frozenset({"phi3"}), PHI3),
    Family("chatml", frozenset({"<|im_start|>", "<|im_end|>"}), frozenset(), CHATML),
)
"""Checked in order: a vocabulary with both Gemma's and ChatML's tokens is Gemma's."""

MARKER_TOKENS: Final = frozenset().union(*(family.markers for family in FAMILIES))
"""The tokens a vocabulary scan must look for (``modelstore.sources``)."""


@dataclass(frozen=True)
class InferredTemplate:
    family: str
    template: str
    adds_bos: bool

    @property
    def source(self) -> str:
        """What ``ModelConfig.template_source`` records: ``inferred:gemma``."""
        return f"{INFERRED_PREFIX}{self.family}"


INFERRED_PREFIX: Final = "inferred:"
UNKNOWN_SOURCE: Final = "none"
"""``template_source`` of a model with no template and none inferable: only ``raw`` prompts."""
NO_TEMPLATE_WARNING: Final = (
    "the model ships no chat template and its vocabulary matches no known chat format; "
    "chats will not be formatted as it expects. Give one with a ModelSpec `template`, or use "
    "raw prompts (`/api/generate` with `raw: true`)."
)


def infer_template(
    architecture: str | None, vocabulary: set[str] | frozenset[str], adds_bos: bool
) -> InferredTemplate | None:
    """The family whose markers ``vocabulary`` holds (or whose architecture this is), with
    ``{{ bos_token }}`` written in front when the tokenizer adds BOS; ``None`` if none fits."""
    arch = (architecture or "").lower()
    for family in FAMILIES:
        if family.markers <= vocabulary or arch in family.architectures:
            template = (BOS if adds_bos else "") + family.template
            return InferredTemplate(family.name, template, adds_bos)
    return None


def inferred_family(template_source: str | None) -> str | None:
    """``gemma`` for ``inferred:gemma``; ``None`` for a template the model or a spec gave."""
    if template_source and template_source.startswith(INFERRED_PREFIX):
        return template_source.removeprefix(INFERRED_PREFIX)
    return None


def template_warning(template_source: str | None) -> str | None:
    """What ``mlxctl import``, ``mlxctl show`` and ``/api/show`` warn about this template."""
    family = inferred_family(template_source)
    if family:
        return (
            f"the model ships no chat template; a {family} template was inferred from its "
            "special tokens (see the template shown; override it with a ModelSpec `template`)"
        )
    if template_source == UNKNOWN_SOURCE:
        return NO_TEMPLATE_WARNING
    return None


GO_TEMPLATE: Final = re.compile(
    r"\{\{-?\s*(?:(?:if|range|with|else if|template|block)\s+)?\.[A-Za-z]"
)
"""Ollama's Go templates read fields with a leading dot (``{{ .Prompt }}``, ``{{ if .System }}``);
a Jinja expression never starts with one."""


def go_template_error(template: str) -> str | None:
    """Why a Go template cannot be used, with where the model's own template is; else None."""
    if not GO_TEMPLATE.search(template):
        return None
    return (
        "this is a Go template (Ollama's `{{ .Prompt }}` syntax); mlxserve renders chat "
        "templates with Jinja, as Hugging Face tokenizers do. Most models ship a Jinja template "
        "already: leave `template` out to use the model's own (see it with `mlxctl show NAME` "
        "or POST /api/show, field `template`; in an HF folder it is `chat_template` in "
        "tokenizer_config.json, in a GGUF `tokenizer.chat_template`)."
    )
