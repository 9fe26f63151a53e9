"""The ModelRunner protocol and the shapes that cross it.

Every runner takes a ``GenerateRequest`` and yields ``GenerateChunk``s; the daemon and
``mlxctl run`` depend on these shapes only, never on a runner's library.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from mlxserve.errors import UnsupportedFeatureError
from modelstore.model import LocalModel
from modelstore.parameters import Sampling

DoneReason = Literal["stop", "length", "cancelled"]


class CancelToken:
    """A thread-safe flag: the HTTP side sets it, the generation thread polls it every token."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        self._event.set()

    @property
    def cancelled(self) -> bool:
        return self._event.is_set()


@dataclass
class GenerateRequest(Sampling):
    """One generation: ``prompt`` already rendered (``prompts.py``), or ``prompt_tokens``.

    The sampling knobs are ``Sampling``'s (``modelstore/parameters.py``), inherited so that
    they are declared once for every API, the ModelSpec and the CLI.
    """

    prompt: str | None = None
    prompt_tokens: list[int] | None = None
    logprobs: int | None = None
    """Top-n alternatives to report per token; ``None`` reports none, 0 the chosen token only."""
    add_special_tokens: bool = True
    """Whether tokenizing ``prompt`` adds BOS; a chat template usually writes its own."""
    logits_processors: list[Any] = field(default_factory=list)
    """Extra ``(tokens, logits) -> logits`` callables, e.g. a JSON grammar (the daemon's job)."""
    cancel: CancelToken = field(default_factory=CancelToken)
    images: list[bytes] = field(default_factory=list)
    """Encoded images (PNG/JPEG bytes) the prompt refers to, for runners that serve vision models;
    a runner without vision refuses a request that has any."""
    response_format: dict[str, Any] | None = None
    """Constrain the output to JSON: ``{"type": "json"}`` or ``{"type": "json_schema",
    "schema": {...}}``. A runner that cannot honour it raises ``UnsupportedFeatureError``."""
    keep_prefix: bool = False
    """The client asked for its prompt to stay cached (``ChatRequest.keep_prefix``): the
    prompt cache keeps its entry ahead of unmarked ones (``promptcache.py``)."""
    arriving: int = 0
    """How many other requests for the same model were being prepared (rendered, tokenized)
    when this one was handed to the runner: a batching runner waits briefly for them, so that
    a burst is prefilled in one step (``engine.EngineThread.arrived``). Set by the chat core."""
    progress: Callable[[], None] | None = None
    """Called by the runner's prefill after each chunk of the prompt, on its engine thread:
    in a worker, it tells the daemon the worker is alive while no token comes yet
    (``worker.py``), so a long prefill is not taken for a hang. ``None`` in the daemon."""

    def prefilled_chunk(self) -> None:
        """The runner prefilled one more chunk of this request's prompt."""
        if self.progress is not None:
            self.progress()


@dataclass
class EmbedRequest:
    """Texts to embed in one call; runners embed them in padded batches (``pooling.py``)."""

    inputs: list[str]
    truncate: bool = True
    """Cut an input longer than the model's limit; ``False`` refuses it (naming the input)."""


@dataclass
class EmbedResult:
    vectors: list[list[float]]
    """One unit-norm vector per input, in order (unless the model declares no normalisation)."""
    prompt_tokens: int
    """Tokens embedded, after truncation: the usage the APIs report."""


@dataclass
class RerankRequest:
    """One query against many documents; runners score the pairs in batches (``rerank.py``)."""

    query: str
    documents: list[str]
    truncate: bool = True
    """Cut a pair longer than the model's limit (the document's end); ``False`` refuses it."""


@dataclass
class ScoreRequest:
    """A causal reranker's pairs, each already a prompt (its template applied,
    ``chat/rerank.py``), scored by two answer tokens at the prompt's last position: the
    probability of the first against the second, ``sigmoid(logit_yes - logit_no)``. Runners
    score several prompts per forward pass within a token budget (``rerank.py``)."""

    prompts: list[list[int]]
    answers: tuple[int, int]


@dataclass
class RerankResult:
    scores: list[float]
    """One relevance score per document, in the documents' order: the model's raw logit (a
    cross-encoder's, or a causal reranker's yes-minus-no log-odds)."""
    prompt_tokens: int
    """Tokens scored, after truncation, over all pairs: the usage the APIs report."""


@dataclass
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)


@dataclass
class GenerationStats:
    """The stats Ollama reports; durations in nanoseconds."""

    prompt_eval_count: int = 0
    prompt_eval_duration: int = 0
    eval_count: int = 0
    eval_duration: int = 0
    load_duration: int = 0
    total_duration: int = 0
    cached_prompt_tokens: int = 0
    """How many prompt tokens came from the prompt cache instead of being recomputed."""
    time_to_first_token: int = 0
    draft_tokens: int = 0
    """Generated tokens the draft model proposed and the model accepted (speculative decoding)."""


@dataclass
class GenerateChunk:
    """New text since the last chunk; the last chunk has ``done`` set and carries the stats."""

    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    done: bool = False
    done_reason: DoneReason | None = None
    stats: GenerationStats | None = None
    stop_sequence: str | None = None
    """On the last chunk: the stop string that ended the output, if one did."""
    cached_prompt_tokens: int | None = None
    """On the first chunk: the prompt tokens the prompt cache gave (known from admission on),
    so a generation cut short (the reasoning budget's restart) still knows its hit."""


@dataclass
class RunnerOptions:
    """Load-time options; a ModelSpec's parameters fill these, flags override."""

    context_length: int | None = None
    n_gpu_layers: int | None = None
    n_threads: int | None = None
    max_parallel: int | None = None
    kv_cache_type: str | None = None
    """``f16`` (the default), ``q8_0`` or ``q4_0``: see ``kvcache.py``."""
    num_draft_tokens: int | None = None
    """Tokens the draft model proposes per step, when the model has one (``draft:``)."""
    prompt_cache_entries: int = 8
    prompt_cache_bytes: int = 1 << 30
    prompt_cache_dir: str | None = None
    """The disk tier's root (``promptcache.py``); ``None`` keeps prompts in memory only."""
    prompt_cache_disk_bytes: int = 0
    memory_budget_bytes: int = 0
    """The memory a model and its KV cache are planned within (``loading.py``); 0: the
    machine's."""


@dataclass(frozen=True)
class LoadAsk:
    """How one request asks for its model to be loaded (Ollama's ``options.num_ctx``, and
    ``options.kv_cache_type``): a model loaded otherwise is reloaded once its running requests
    finish, as Ollama reloads for ``num_ctx``; what a request leaves unset keeps what is
    loaded."""

    context_length: int | None = None
    kv_cache_type: str | None = None

    def unmet(self, info: LoadedModelInfo) -> bool:
        """Whether the model loaded as ``info`` must be reloaded for this ask. A runner that
        reports no KV cache type (embedding and vision runners) cannot honour one: refused.
        A reload starts from the model's own settings for whatever the request leaves unset."""
        if self.context_length not in (None, info.context_length):
            return True
        loaded_cache = info.details.get("kv_cache_type")
        if self.kv_cache_type is not None and loaded_cache is None:
            raise UnsupportedFeatureError(
                f"the {info.runner} runner has no choice of KV cache type",
                param="kv_cache_type",
            )
        return self.kv_cache_type not in (None, loaded_cache)


@dataclass
class LoadedModelInfo:
    """What a runner loaded: shown by ``/api/ps``, ``mlxctl ps`` and ``--verbose``."""

    runner: str
    format: str
    architecture: str | None
    parameter_count: int | None
    quantization: str | None
    context_length: int
    memory_bytes: int
    max_parallel: int
    load_duration_ns: int = 0
    details: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class ModelRunner(Protocol):
    """What every runner implements. All methods may be called from the asyncio loop."""

    name: str

    @property
    def max_parallel(self) -> int:
        """How many generations it serves at once; the scheduler never exceeds it."""
        ...

    async def load(self, model: LocalModel, options: RunnerOptions) -> LoadedModelInfo: ...

    async def unload(self) -> None: ...

    def generate(self, request: GenerateRequest) -> AsyncIterator[GenerateChunk]: ...

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def detokenize(self, token_ids: list[int]) -> str: ...

    async def embed(self, request: EmbedRequest) -> EmbedResult: ...

    def describe(self) -> LoadedModelInfo: ...

    @property
    def chat_template(self) -> str | None:
        """The tokenizer's own chat template (HF config or GGUF metadata), if any."""
        ...

    @property
    def special_tokens(self) -> dict[str, str]:
        """``bos_token`` / ``eos_token`` strings, for rendering the chat template."""
        ...

    @property
    def image_marker(self) -> str | None:
        """The text that stands for one image in a prompt (libmtmd's marker, the processor's
        image token): the chat core places one where each image sits; ``None`` without vision."""
        ...
