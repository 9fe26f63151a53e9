"""Token ids -> safe text: no half UTF-8 characters, no stop string ever leaked.

Both runners stream through these classes, so stop strings and multi-byte characters behave
the same on MLX and llama.cpp. Hand-written because neither library's streaming matches our
needs: mlx-lm stops on token sequences, not strings, and llama-cpp-python's stop handling
lives inside its completion API, which we do not use.
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any, Protocol


class Detokenizer(Protocol):
    def add(self, token_id: int) -> str:
        """Text completed by this token (possibly empty)."""
        ...

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        ...


class ByteDetokenizer:
    """For tokenizers whose tokens are byte pieces (llama.cpp): decode bytes incrementally."""

    def __init__(self, token_bytes: Callable[[list[int]], bytes]) -> None:
        self._token_bytes = token_bytes
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def add(self, token_id: int) -> str:
        return self._decoder.decode(self._token_bytes([token_id]))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class MlxDetokenizer:
    """Adapts mlx-lm's streaming detokenizer (it already holds back partial characters)."""

    def __init__(self, detokenizer: Any) -> None:
        self._detokenizer = detokenizer
        self._detokenizer.reset()

    def add(self, token_id: int) -> str:
        self._detokenizer.add_token(token_id)
        return self._detokenizer.last_segment

    def flush(self) -> str:
        self._detokenizer.finalize()
        return self._detokenizer.last_segment


class StopStringFilter:
    """Holds back any tail that could still become a stop string; cuts at the first match."""

    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self._held = ""
        self.stopped = False

    def feed(self, text: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        cut = min((i for i in (buffer.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self._held = ""
            self.stopped = True
            return buffer[:cut], True
        keep = 0
        for stop in self.stops:
            for length in range(min(len(stop) - 1, len(buffer)), 0, -1):
                if buffer.endswith(stop[:length]):
                    keep = max(keep, length)
                    break
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return "" if self.stopped else held


class TextStream:
    """A detokenizer followed by a stop-string filter: ``push`` per token, ``finish`` at end."""

    def __init__(self, detokenizer: Detokenizer, stops: list[str]) -> None:
        self._detokenizer = detokenizer
        self._filter = StopStringFilter(stops)

    @property
    def stopped(self) -> bool:
        return self._filter.stopped

    def push(self, token_id: int) -> tuple[str, bool]:
        return self._filter.feed(self._detokenizer.add(token_id))

    def finish(self) -> str:
        if self._filter.stopped:
            return ""
        text, _ = self._filter.feed(self._detokenizer.flush())
        return text + self._filter.flush()
