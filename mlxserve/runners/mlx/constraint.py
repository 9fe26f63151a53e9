"""Constrained decoding on MLX: an llguidance matcher as an mlx-lm logits processor.

The grammar is the runner-neutral one (``runners/constrained.py``). Each request gets its own
matcher inside its own logits processor, so constrained and free requests share one
``BatchGenerator`` batch and batching keeps working.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mlxserve.errors import InvalidFormatError, UnsupportedFeatureError

_BITS = np.arange(32, dtype=np.uint32)


def build_tokenizer(hf_tokenizer: Any, eos_ids: list[int]) -> Any:
    """The llguidance view of the model's tokenizer (about a second: cache it per model)."""
    try:
        import llguidance.hf
    except ImportError as exc:
        raise UnsupportedFeatureError(
            "JSON-constrained output on MLX needs llguidance: pip install llguidance"
        ) from exc
    return llguidance.hf.from_tokenizer(hf_tokenizer, eos_token=eos_ids or None)


class JsonConstraint:
    """``(tokens, logits) -> logits``: only tokens the grammar allows keep their logits.

    Called once per generated token with the sequence so far; from the second call on, the
    last token in ``tokens`` is the one just sampled, which the matcher consumes first.
    """

    def __init__(self, tokenizer: Any, grammar: str) -> None:
        from llguidance import LLMatcher
        from llguidance.numpy import allocate_token_bitmask

        self._matcher = LLMatcher(tokenizer, grammar, log_level=0)
        if self._matcher.is_error():
            raise InvalidFormatError(f"unsupported JSON schema: {self._matcher.get_error()}")
        self._vocab = tokenizer.vocab_size
        self._bitmask = allocate_token_bitmask(1, self._vocab)
        self._started = False

    def __call__(self, tokens: Any, logits: Any) -> Any:
        import mlx.core as mx
        from llguidance.numpy import fill_next_token_bitmask

        if self._started:
            self._matcher.consume_token(int(tokens[-1].item()))
        self._started = True
        fill_next_token_bitmask(self._matcher, self._bitmask)
        words = self._bitmask[0].view(np.uint32)
        allowed = ((words[:, None] >> _BITS) & 1).astype(bool).reshape(-1)[: self._vocab]
        width = logits.shape[-1]
        if width > allowed.size:
            allowed = np.concatenate([allowed, np.zeros(width - allowed.size, dtype=bool)])
        mask = mx.array(allowed[:width])
        return mx.where(mask, logits, mx.array(-float("inf"), dtype=logits.dtype))
