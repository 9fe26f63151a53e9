"""Parallel slots with continuous batching on one llama.cpp context.

llama-cpp-python's high-level ``Llama.generate`` drives one sequence per context, so eight
clients would take turns. llama.cpp itself decodes many sequences in one ``llama_decode``
(its server's ``-np`` slots): this module is that loop, written against the C API that
llama-cpp-python exposes, because no Python package ships it. One context holds ``N`` sequence
slots, each with its own KV stream of ``slot_context`` cells; every step puts one token of each
decoding sequence and a chunk of each newly admitted prompt into one batch, so a long prompt
never stalls the others for more than a chunk, and a step over eight sequences costs little
more than a step over one on a CPU.

Everything here runs on the runner's engine thread (``engine.py``); the async side only submits
jobs and reads the chunks each sequence emits.
"""

from __future__ import annotations

import ctypes
import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mlxserve.errors import InferenceError, InvalidFormatError
from mlxserve.runners.base import GenerateRequest, TokenLogprob
from mlxserve.runners.decode import DecodeState, SampledToken
from mlxserve.runners.engine import END
from mlxserve.runners.kvcache import KvCacheType, ggml_bytes_per_token, ggml_check
from mlxserve.runners.llamacpp.media import IMAGE_POSITION, MediaProjector, text_prefix
from mlxserve.runners.promptcache import Hit, PromptCache, common_prefix
from mlxserve.runners.textstream import ByteDetokenizer, TextStream

log = logging.getLogger("mlxserve.llamacpp")

RANDOM_SEED = 0xFFFFFFFF
"""llama.cpp's LLAMA_DEFAULT_SEED: a fresh random seed for each request."""
PREFILL_TOKENS = 512
"""Prompt tokens one step takes at most (besides one token per decoding sequence): the chunk
that bounds how long a new prompt can hold back the sequences already decoding."""


LORA_SCALE = 1.0
"""The adapter at the strength it was trained for (llama.cpp scales by its ``alpha / rank``)."""
PIECE_BUFFER_BYTES = 64
"""A first guess at a token's size; a longer piece is read again with the size llama.cpp asks."""


def token_piece(llama_cpp: Any, vocab: Any, token: int) -> bytes:
    """One token's bytes, special tokens included.

    Written here because llama-cpp-python's ``detokenize`` reads every piece into a fixed
    32-byte buffer and silently cuts longer ones, and by default drops control tokens, which
    are exactly the tool-call and think markers (Mistral's ``[TOOL_CALLS]``, LFM2's
    ``<|tool_call_start|>``) the chat core must see, as it does on MLX. End-of-generation
    tokens never reach the text (``DecodeState`` ends the answer first).
    """
    size = PIECE_BUFFER_BYTES
    while True:
        buffer = ctypes.create_string_buffer(size)
        length = llama_cpp.llama_token_to_piece(vocab, token, buffer, size, 0, True)
        if length >= 0:
            return buffer.raw[:length]
        size = -length


class TokenMask:
    """An llguidance matcher as an in-place mask on one sequence's numpy logits.

    The same grammar as the MLX runner (``runners/constrained.py``), so ``format`` accepts the
    same schemas on both runners; the tokenizer comes from the GGUF's own vocabulary
    (``llguidance.llamacpp``), so no HF tokenizer is needed.
    """

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise InvalidFormatError(f"unsupported JSON schema: {self._matcher.get_error()}")
        self._bitmask = allocate_token_bitmask(1, tokenizer.vocab_size)

    def apply(self, logits: np.ndarray) -> None:
        from llguidance.numpy import apply_token_bitmask_inplace, fill_next_token_bitmask

        fill_next_token_bitmask(self._matcher, self._bitmask)
        apply_token_bitmask_inplace(logits, self._bitmask)

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)


@dataclass
class Sequence:
    """One request from admission to its last chunk."""

    request: GenerateRequest
    prompt: list[int]
    state: DecodeState
    emit: Callable[[object], None]
    sampler: Any
    mask: TokenMask | None
    slot: Slot | None = None
    prefilled: int = 0
    """Prompt tokens whose KV is in the slot; the rest are still to be prefilled."""
    pending_token: int | None = None
    """The last sampled token, fed to the model in the next step."""
    logits_index: int = -1
    generated: list[int] = field(default_factory=list)
    drafts: list[int] = field(default_factory=list)
    """Tokens prompt lookup proposed after ``pending_token``, decoded with it this step."""
    draft_indices: list[int] = field(default_factory=list)
    """Batch rows of the pending token and each draft, whose logits verify the drafts."""
    media: Any = None
    """libmtmd's text and image chunks (``media.py``): the text before the first image is
    prefilled (or reused) like any prompt's, the rest by libmtmd once that text is in."""
    text_tokens: int = 0
    """How many prompt tokens come before the first image (all of them without images): the
    most a cached prefix can give, and where libmtmd takes over the prefill."""
    hit: Hit | None = None
    """What the prompt cache (``promptcache.py``) holds of the prompt, restored on admission
    when no live slot holds more."""
    admitted: float = 0.0
    """When its prefill began (after any restore): the prompt cache's prefill-rate sample."""


@dataclass
class Slot:
    """A KV stream of the context: which tokens it holds, for prefix reuse."""

    seq_id: int
    tokens: list[int] = field(default_factory=list)
    sequence: Sequence | None = None
    last_used: float = 0.0


class SlotEngine:
    """The context, its slots and the decode loop; ``step`` is registered on the engine thread.

    ``model`` is llama-cpp-python's ``_internals.LlamaModel``: the context is created here (not
    through ``Llama``) because ``Llama`` fixes one sequence per context. ``flash_attention``:
    the runner's choice for the model (``platform.llama_cpp_flash_attention``).
    """

    def __init__(
        self,
        llama_cpp: Any,
        model: Any,
        *,
        slots: int,
        slot_context: int,
        n_threads: int,
        eog: set[int],
        kv_cache: KvCacheType,
        flash_attention: bool = True,
        lookup_tokens: int = 0,
        lora: Any = None,
        projector: Path | None = None,
        cache: PromptCache | None = None,
    ) -> None:
        from llama_cpp import _internals

        self._llama_cpp = llama_cpp
        self._model = model
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = slots * slot_context
        params.n_seq_max = slots
        # A stream of ``slot_context`` cells per slot, all allocated now: llama.cpp sizes its KV
        # cache once, when the context is made, and cannot grow it. A unified cache (cells
        # shared by the slots) was measured and refused: where a sequence's cells sit among
        # the others' changes its sums, so batched != solo (tests/test_llamacpp_slots.py fails
        # with flash attention on or off), and without flash attention its attention scores
        # span every cell (a 656 MiB compute buffer at 8 x 4096 against 101 MiB).
        # docs/PERFORMANCE.md, issue 26.
        params.kv_unified = False
        self._capacity = PREFILL_TOKENS + slots
        params.n_batch = params.n_ubatch = self._capacity
        params.n_threads = params.n_threads_batch = n_threads
        params.no_perf = True
        params.type_k = params.type_v = kv_cache.ggml_type
        params.flash_attn_type = (
            llama_cpp.LLAMA_FLASH_ATTN_TYPE_ENABLED
            if flash_attention
            else llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        )
        self._context = _internals.LlamaContext(model=model, params=params, verbose=False)
        if lora is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(lora)
            scales = (ctypes.c_float * 1)(LORA_SCALE)
            if llama_cpp.llama_set_adapters_lora(self._context.ctx, adapters, 1, scales) != 0:
                self._context.close()
                raise InferenceError("llama.cpp could not apply the model's adapter")
        self.slot_context = min(slot_context, llama_cpp.llama_n_ctx_seq(self._context.ctx))
        self._batch = llama_cpp.llama_batch_init(self._capacity, 0, 1)
        self._memory = llama_cpp.llama_get_memory(self._context.ctx)
        self._vocab = model.n_vocab()
        self._eog = eog
        self.slots = [Slot(seq_id) for seq_id in range(slots)]
        self._lookup = None
        if lookup_tokens:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding

            self._lookup = LlamaPromptLookupDecoding(num_pred_tokens=lookup_tokens)
        self._waiting: deque[Sequence] = deque()
        self.cache = cache
        self.media: MediaProjector | None = None
        if projector is not None:
            try:
                self.media = MediaProjector(llama_cpp, model.model, projector, n_threads)
            except BaseException:
                self._llama_cpp.llama_batch_free(self._batch)
                self._context.close()
                raise

    def close(self) -> None:
        """Finish every sequence as cancelled and free the context (on the engine thread)."""
        for sequence in [*self._waiting, *(s.sequence for s in self.slots if s.sequence)]:
            self._finish(sequence, "cancelled")
        self._waiting.clear()
        if self.media is not None:
            self.media.close()
        self._llama_cpp.llama_batch_free(self._batch)
        self._context.close()

    def forget_prefixes(self) -> None:
        """Drop the KV cache that free slots and the prompt cache's RAM tier keep for
        follow-ups (a cold start, for benches)."""
        if self.cache is not None:
            self.cache.forget_ram()
        for slot in self.slots:
            if slot.sequence is None:
                slot.tokens.clear()
                self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)

    # -- admission --------------------------------------------------------------------------

    def join(
        self,
        request: GenerateRequest,
        prompt: list[int],
        max_tokens: int,
        emit: Callable[[object], None],
        mask: TokenMask | None,
        media: Any = None,
        hit: Hit | None = None,
    ) -> None:
        """Queue a request; it takes a slot at the start of the next step. ``media`` are its
        libmtmd chunks (``prompt`` then has ``IMAGE_POSITION`` for each image position)."""
        try:
            state = DecodeState(
                text=TextStream(ByteDetokenizer(self._token_bytes), request.stop),
                is_end_of_sequence=self._eog.__contains__,
                max_tokens=max_tokens,
                cancel=request.cancel,
                prompt_tokens=len(prompt),
            )
            sampler = self._sampler(request)
        except Exception as exc:  # handed to the request's stream
            if media is not None and self.media is not None:
                self.media.free(media)
            emit(exc)
            return
        sequence = Sequence(request, prompt, state, emit, sampler, mask, media=media, hit=hit)
        sequence.text_tokens = text_prefix(prompt)
        self._waiting.append(sequence)

    def live_prefix(self, prompt: list[int]) -> int:
        """The longest prefix of ``prompt`` a slot holds (read off the engine thread: a hint
        for whether the prompt cache is worth reading, checked again on admission)."""
        return max((common_prefix(list(slot.tokens), prompt) for slot in self.slots), default=0)

    def _sampler(self, request: GenerateRequest) -> Any:
        """llama.cpp's sampler chain, in the order ``Llama.generate`` builds it (penalties
        first, then the truncations, temperature and the seeded draw), one per sequence so a
        seed gives the same tokens whatever else is in the batch. The penalties' window is no
        wider than a slot (llama.cpp allocates it whole; ``repeat_last_n: -1`` asks for the
        widest): a window past every token a slot can hold is the same window."""
        from llama_cpp import _internals

        sampler = _internals.LlamaSampler()
        sampler.add_penalties(
            self._vocab,
            min(request.repetition_context_size, self.slot_context),
            request.repetition_penalty,
            request.frequency_penalty,
            request.presence_penalty,
        )
        if request.temperature <= 0:
            sampler.add_greedy()
            return sampler
        sampler.add_top_k(request.top_k)
        sampler.add_top_p(request.top_p)
        sampler.add_min_p(request.min_p)
        sampler.add_temp(request.temperature)
        sampler.add_dist(RANDOM_SEED if request.seed is None else request.seed)
        return sampler

    def _admit(self) -> None:
        """Give waiting requests a free slot: the one holding the longest prefix of the
        prompt (a follow-up turn), else the least recently used (keeping recent caches)."""
        while self._waiting:
            free = [slot for slot in self.slots if slot.sequence is None]
            if not free:
                return
            sequence = self._waiting.popleft()
            if sequence.state.cancel.cancelled:
                self._finish(sequence, "cancelled")
                continue
            prompt = sequence.prompt
            slot = max(free, key=lambda s: (common_prefix(s.tokens, prompt), -s.last_used))
            # An image's positions hold its embeddings: equal markers are not equal images, so
            # what a prompt reuses ends at its first image.
            cached = min(common_prefix(slot.tokens, prompt), len(prompt) - 1, sequence.text_tokens)
            hit, sequence.hit = sequence.hit, None
            if hit is not None and hit.tokens > cached:
                cached = self._restore(slot, hit)
                if not cached:
                    hit = None
            else:
                hit = None
            if self.cache is not None:
                self.cache.record(hit, cached)
            if not self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, cached, -1):
                self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
                cached = 0
            slot.tokens = prompt[:cached]
            slot.sequence, sequence.slot = sequence, slot
            sequence.prefilled = cached
            sequence.state.cached_prompt_tokens = cached
            sequence.admitted = time.perf_counter()

    def _restore(self, slot: Slot, hit: Hit) -> int:
        """Load a cached state into ``slot`` (llama.cpp's per-sequence state); the prompt
        tokens it gives, or 0 when llama.cpp refuses it (the slot is then empty)."""
        llama_cpp = self._llama_cpp
        llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
        started = time.perf_counter()
        source = (ctypes.c_uint8 * len(hit.payload)).from_buffer_copy(hit.payload)
        read = 0
        if hit.entry_tokens <= self.slot_context:
            read = llama_cpp.llama_state_seq_set_data_ext(
                self._context.ctx, source, len(hit.payload), slot.seq_id, 0
            )
        if read and self.cache is not None:
            self.cache.note_restore(len(hit.payload), time.perf_counter() - started)
        if read == 0:
            log.warning("llama.cpp refused a cached prompt state; prefilling instead")
            llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
            slot.tokens = []
            return 0
        return hit.tokens

    def _snapshot(self, slot: Slot, *, keep: bool = False) -> None:
        """Hand the finished slot's state to the prompt cache (written behind to disk);
        ``keep``: the request's caching hint. A slot that holds images is first cut back to
        the text before them, all a later prompt can reuse of it (``_admit``)."""
        images = text_prefix(slot.tokens)
        if images < len(slot.tokens):
            self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, images, -1)
            del slot.tokens[images:]
        cache, tokens = self.cache, slot.tokens
        if cache is None or not cache.wants(tokens):
            return
        llama_cpp, context = self._llama_cpp, self._context.ctx
        size = llama_cpp.llama_state_seq_get_size_ext(context, slot.seq_id, 0)
        buffer = (ctypes.c_uint8 * size)()
        written = llama_cpp.llama_state_seq_get_data_ext(context, buffer, size, slot.seq_id, 0)
        if written:
            cache.store(list(tokens), ctypes.string_at(buffer, written), keep=keep)

    # -- the step ---------------------------------------------------------------------------

    def step(self) -> bool:
        """One ``llama_decode``: a token for every decoding sequence, prompt chunks for the
        new ones; then a token sampled for each sequence whose logits came out."""
        for slot in self.slots:
            if slot.sequence is not None and slot.sequence.state.cancel.cancelled:
                self._finish(slot.sequence, "cancelled")
        self._admit()
        for slot in self.slots:
            sequence = slot.sequence
            if (
                sequence is not None
                and sequence.media is not None
                and sequence.prefilled == sequence.text_tokens
            ):
                self._prefill_media(sequence)
        active = [slot.sequence for slot in self.slots if slot.sequence is not None]
        if not active:
            return bool(self._waiting)
        batch = self._batch
        batch.n_tokens = 0
        sampling: list[Sequence] = []
        for sequence in active:
            if sequence.pending_token is not None:
                room = self._capacity - batch.n_tokens - 1
                sequence.drafts = self._drafts(sequence, room)
                self._add(sequence, sequence.pending_token, logits=True)
                sequence.pending_token = None
                sequence.draft_indices = [sequence.logits_index]
                for token in sequence.drafts:
                    self._add(sequence, token, logits=True)
                    sequence.draft_indices.append(sequence.logits_index)
                sampling.append(sequence)
        room = self._capacity - batch.n_tokens
        prefilled: list[Sequence] = []
        chunked: list[Sequence] = []
        for sequence in active:
            # A prompt with images: its text before the first image here, the rest by libmtmd.
            end = len(sequence.prompt) if sequence.media is None else sequence.text_tokens
            left = end - sequence.prefilled
            if left == 0 or room == 0:
                continue
            chunk = sequence.prompt[sequence.prefilled : sequence.prefilled + min(room, left)]
            for offset, token in enumerate(chunk):
                self._add(sequence, token, logits=offset == left - 1 and sequence.media is None)
            sequence.prefilled += len(chunk)
            room -= len(chunk)
            chunked.append(sequence)
            if sequence.prefilled == len(sequence.prompt):
                sampling.append(sequence)
                prefilled.append(sequence)
        status = self._llama_cpp.llama_decode(self._context.ctx, batch)
        if status != 0:
            error = InferenceError(f"llama.cpp could not decode (status {status})")
            for sequence in active:
                self._finish(sequence, error=error)
            return bool(self._waiting)
        for sequence in chunked:
            sequence.request.prefilled_chunk()
        if self.cache is not None:
            now = time.perf_counter()
            for sequence in prefilled:
                tokens = len(sequence.prompt) - sequence.state.cached_prompt_tokens
                self.cache.note_prefill(tokens, now - sequence.admitted)
        for sequence in sampling:
            if sequence.drafts:
                self._verify(sequence)
            else:
                self._advance(sequence)
        return True

    def _prefill_media(self, sequence: Sequence) -> None:
        """Prefill a prompt's images and the text after them through libmtmd into the
        sequence's slot, in its own decodes (the text before the first image is in already),
        and sample its first token from the logits that leaves (before this step's batch
        overwrites them); from then on it decodes in the batch like any other."""
        slot, chunks = sequence.slot, sequence.media
        assert slot is not None and self.media is not None
        sequence.media = None
        try:
            self.media.prefill(
                self._context.ctx,
                chunks,
                slot.seq_id,
                self._capacity,
                sequence.prefilled,
                sequence.request.prefilled_chunk,
            )
        except Exception as exc:
            self._finish(sequence, error=exc)
            return
        slot.tokens = list(sequence.prompt)
        sequence.prefilled = len(sequence.prompt)
        sequence.logits_index = -1
        self._advance(sequence)

    def _drafts(self, sequence: Sequence, room: int) -> list[int]:
        """Prompt lookup's guess at the tokens after the pending one: what followed the last
        n-gram where it occurred before (llama-cpp-python's ``LlamaPromptLookupDecoding``).
        Greedy, unconstrained requests only: there a guess changes nothing but the speed."""
        request = sequence.request
        if (
            self._lookup is None
            or room <= 0
            or request.temperature > 0
            or sequence.mask is not None
            or request.logits_processors
            or IMAGE_POSITION in sequence.prompt
        ):
            return []
        history = np.array([*sequence.prompt, *sequence.generated], dtype=np.intc)
        left = sequence.state.max_tokens - sequence.state.count - 1
        return [int(t) for t in self._lookup(history)[: min(room, max(left, 0))]]

    def _verify(self, sequence: Sequence) -> None:
        """Sample at the pending token and after each draft until a sample differs from the
        draft: every sample was taken on a correct prefix, so the answer is the one plain
        decoding gives. The KV of rejected drafts is removed before anything is emitted."""
        drafts, indices, slot = sequence.drafts, sequence.draft_indices, sequence.slot
        assert slot is not None
        sequence.drafts, sequence.draft_indices = [], []
        samples: list[SampledToken] = []
        for position, index in enumerate(indices):
            sequence.logits_index = index
            try:
                samples.append(self._sample(sequence))
            except Exception as exc:  # a caller's logits bias failed
                self._finish(sequence, error=exc)
                return
            if position == len(drafts) or samples[-1].token_id != drafts[position]:
                break
        keep = len(slot.tokens) - len(drafts) + len(samples) - 1
        if keep < len(slot.tokens):
            self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, keep, -1)
            del slot.tokens[keep:]
        for position, sampled in enumerate(samples):
            if position < len(samples) - 1:
                sequence.state.draft_tokens += 1
            chunk = sequence.state.push(sampled)
            if chunk is not None:
                sequence.emit(chunk)
            if sequence.state.done:
                self._finish(sequence)
                return
            sequence.generated.append(sampled.token_id)
        sequence.pending_token = samples[-1].token_id

    def _add(self, sequence: Sequence, token: int, *, logits: bool) -> None:
        batch, slot = self._batch, sequence.slot
        assert slot is not None
        i = batch.n_tokens
        batch.token[i] = token
        batch.pos[i] = len(slot.tokens)
        batch.n_seq_id[i] = 1
        batch.seq_id[i][0] = slot.seq_id
        batch.logits[i] = logits
        if logits:
            sequence.logits_index = i
        slot.tokens.append(token)
        batch.n_tokens = i + 1

    def _advance(self, sequence: Sequence) -> None:
        """Sample this sequence's next token and emit what it completes."""
        try:
            sampled = self._sample(sequence)
        except Exception as exc:  # a caller's logits processor or the grammar failed
            self._finish(sequence, error=exc)
            return
        chunk = sequence.state.push(sampled)
        if chunk is not None:
            sequence.emit(chunk)
        if sequence.state.done:
            self._finish(sequence)
        else:
            sequence.generated.append(sampled.token_id)
            sequence.pending_token = sampled.token_id

    def _sample(self, sequence: Sequence) -> SampledToken:
        """Our logits stage (bias, the caller's processors, the grammar mask, logprobs) on the
        context's own logits buffer, in place, then llama.cpp's sampler chain on it."""
        request, index = sequence.request, sequence.logits_index
        logprob = None
        if (
            request.logit_bias
            or request.logits_processors
            or sequence.mask
            or (request.logprobs is not None)
        ):
            pointer = self._llama_cpp.llama_get_logits_ith(self._context.ctx, index)
            logits = np.ctypeslib.as_array(pointer, shape=(self._vocab,))
            if request.logit_bias:
                ids = np.fromiter(request.logit_bias, dtype=np.int64)
                logits[ids] += np.fromiter(request.logit_bias.values(), dtype=np.float32)
            if request.logits_processors:
                history = np.array(sequence.prompt + sequence.generated, dtype=np.intc)
                for processor in request.logits_processors:
                    logits[:] = processor(history, logits)
            if sequence.mask is not None:
                sequence.mask.apply(logits)
            token = self._llama_cpp.llama_sampler_sample(
                sequence.sampler.sampler, self._context.ctx, index
            )
            if request.logprobs is not None:
                logprob = self._logprob(token, logits, request.logprobs)
        else:
            token = self._llama_cpp.llama_sampler_sample(
                sequence.sampler.sampler, self._context.ctx, index
            )
        if sequence.mask is not None and token not in self._eog:
            sequence.mask.consume(token)
        return SampledToken(token, logprob)

    def _logprob(self, token: int, logits: np.ndarray, top_n: int) -> TokenLogprob:
        shifted = logits - logits.max()
        logprobs = shifted - np.log(np.exp(shifted).sum())
        top: list[tuple[int, str, float]] = []
        if top_n > 0:
            best = np.argpartition(-logprobs, top_n)[:top_n]
            best = best[np.argsort(-logprobs[best])]
            top = [(int(i), self._piece(int(i)), float(logprobs[i])) for i in best]
        return TokenLogprob(token, self._piece(token), float(logprobs[token]), top)

    def _piece(self, token: int) -> str:
        return token_piece(self._llama_cpp, self._model.vocab, token).decode("utf-8", "replace")

    def _token_bytes(self, tokens: list[int]) -> bytes:
        return b"".join(token_piece(self._llama_cpp, self._model.vocab, t) for t in tokens)

    def _finish(
        self, sequence: Sequence, reason: Any = None, *, error: BaseException | None = None
    ) -> None:
        """Free the sequence's slot (its KV stays for a follow-up) and end its stream. The
        slot's state goes to the prompt cache after the stats are taken (a snapshot copies the
        whole sequence's KV: that is not decode time) and before the stream ends (a caller
        that saw the end finds the entry)."""
        if sequence.media is not None and self.media is not None:
            self.media.free(sequence.media)
            sequence.media = None
        slot = sequence.slot
        if slot is not None:
            slot.sequence, sequence.slot = None, None
            slot.last_used = time.monotonic()
            if error is not None:
                slot.tokens.clear()
                self._llama_cpp.llama_memory_seq_rm(self._memory, slot.seq_id, 0, -1)
        sequence.sampler.close()
        if error is not None:
            sequence.emit(error)
        else:
            last = sequence.state.finish(reason)
            if slot is not None:
                self._snapshot(slot, keep=sequence.request.keep_prefix)
            sequence.emit(last)
        sequence.emit(END)


def kv_bytes_per_token(llama_cpp: Any, model: Any, cache: KvCacheType) -> int:
    """KV cache bytes one token takes (keys and values of ``cache``'s type over every layer),
    for memory admission before the context exists."""
    handle = model.model
    heads = max(llama_cpp.llama_model_n_head(handle), 1)
    head_dim = llama_cpp.llama_model_n_embd(handle) // heads
    ggml_check(cache, head_dim)
    kv_width = llama_cpp.llama_model_n_head_kv(handle) * head_dim
    return ggml_bytes_per_token(cache, llama_cpp.llama_model_n_layer(handle), kv_width)
