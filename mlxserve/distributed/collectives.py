"""Messages between ranks, carried by ``mx.distributed`` collectives only.

mlx has ``all_sum`` and ``all_gather`` but no broadcast, and no way to send a Python value; so
a message is JSON bytes in an ``int32`` array, its length sent first (every rank must know the
shape before the collective), and a broadcast is an ``all_sum`` to which only rank 0
contributes. Small, and only for decisions (a join, an end, a verdict); tensors never travel
this way.

Every collective here runs on mlx-lm's ``generation_stream`` (thread-local), the stream on which
``BatchGenerator`` steps and so the model's own all-sums run: collectives on two streams could
interleave on the wire and scramble each other.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any


def _encode(value: Any) -> Any:
    import mlx.core as mx
    import numpy as np

    data = np.frombuffer(json.dumps(value, separators=(",", ":")).encode(), dtype=np.uint8)
    return mx.array(data.astype(np.int32))


def _decode(array: Any) -> Any:
    import numpy as np

    return json.loads(np.array(array).astype(np.uint8).tobytes().decode())


def broadcast_json(group: Any, value: Any = None) -> Any:
    """Rank 0's ``value`` on every rank (other ranks pass nothing)."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    with mx.stream(generation_stream):
        return _broadcast(mx, group, value)


def _broadcast(mx: Any, group: Any, value: Any) -> Any:
    leader = group.rank() == 0
    payload = _encode(value) if leader else None
    length = mx.array([payload.size if leader else 0], dtype=mx.int32)
    length = int(mx.distributed.all_sum(length, group=group).item())
    if not leader:
        payload = mx.zeros((length,), dtype=mx.int32)
    payload = mx.distributed.all_sum(payload, group=group)
    mx.eval(payload)
    return _decode(payload)


def gather_json(group: Any, value: Any) -> list[Any]:
    """Every rank's ``value``, in rank order, on every rank."""
    import mlx.core as mx
    from mlx_lm.generate import generation_stream

    with mx.stream(generation_stream):
        return _gather(mx, group, value)


def _gather(mx: Any, group: Any, value: Any) -> list[Any]:
    payload = _encode(value)
    lengths = mx.distributed.all_gather(
        mx.array([payload.size], dtype=mx.int32), group=group
    ).tolist()
    width = max(lengths)
    padded = mx.concatenate([payload, mx.zeros((width - payload.size,), dtype=mx.int32)])
    rows = mx.distributed.all_gather(padded[None], group=group)
    mx.eval(rows)
    return [_decode(rows[i, :n]) for i, n in enumerate(lengths)]


def shared_sampler(group: Any, sampler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Every rank takes rank 0's token: rank 0 samples (with its logits processors, grammar and
    seed), the others contribute zeros to an ``all_sum`` inside the step's own graph.

    Why broadcast rather than seed every rank alike: only rank 0 runs the per-request logits
    processors (a JSON grammar's matcher lives there, fed by the HTTP side), and tensor-parallel
    logits may differ in the last bit between ranks, so identical seeds could still diverge.
    """
    import mlx.core as mx

    leader = group.rank() == 0

    def sample(logprobs: Any) -> Any:
        token = sampler(logprobs).astype(mx.int32)
        if not leader:
            token = mx.zeros_like(token)
        return mx.distributed.all_sum(token, group=group).astype(mx.uint32)

    return sample


def follower_sampler(logprobs: Any) -> Any:
    """What a follower draws: nothing of its own (``shared_sampler`` replaces it with rank 0's)."""
    import mlx.core as mx

    return mx.zeros(logprobs.shape[:-1], dtype=mx.int32)
