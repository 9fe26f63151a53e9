"""Token ids -> safe text: no half UTF-8 characters, no stop string ever leaked.

Both runners stream through these classes, so stop strings and multi-byte characters behave
the same on MLX and llama.cpp. Hand-written because neither library's streaming matches our
needs: mlx-lm stops on token sequences, not strings, and llama-cpp-python's stop handling
lives inside its completion API, which we do not use.

Two layers, each with one job: a detokenizer turns token ids into *complete* characters (a
token can end in the middle of a multi-byte character: "🙂" is four byte tokens in many
vocabularies), then ``StopStringFilter`` turns characters into text that can no longer turn
out to be part of a stop string (a stop string often spans several tokens).
"""

from __future__ import annotations

import codecs
from collections.abc import Callable
from typing import Any, Protocol


class Detokenizer(Protocol):
    """Token ids in, complete characters out; what ``TextStream`` needs from any runner."""

    def add(self, token_id: int) -> str:
        """Text completed by this token (possibly empty)."""
        ...

    def flush(self) -> str:
        """Whatever is still held back, at the end of generation."""
        ...


class ByteDetokenizer:
    """For tokenizers whose tokens are byte pieces (llama.cpp): decode bytes incrementally.

    The incremental UTF-8 decoder keeps an incomplete trailing sequence until the bytes that
    complete it arrive, so a character is never emitted half-way; invalid bytes become U+FFFD
    rather than an exception, since a model can sample any byte sequence.
    """

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
    """Holds back any tail that could still become a stop string; cuts at the first match.

    "First" is the first stop string to *complete* while streaming, as llama.cpp and Ollama
    do: text already emitted cannot be taken back, so nothing waits for a longer stop string
    that might have started earlier. Whatever is emitted never contains a stop string.
    """

    def __init__(self, stops: list[str]) -> None:
        self.stops = [stop for stop in stops if stop]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None
        """The stop string that ended the text (Anthropic reports it as ``stop_sequence``)."""

    def feed(self, text: str) -> tuple[str, bool]:
        """Text safe to emit now, and whether a stop string was hit (nothing follows then)."""
        if self.stopped:
            return "", True
        if not self.stops:
            return text, False
        buffer = self._held + text
        hits = [(index, stop) for stop in self.stops if (index := buffer.find(stop)) >= 0]
        if hits:
            self._held = ""
            self.stopped = True
            cut, self.matched = min(hits, key=lambda hit: hit[0])
            return buffer[:cut], True
        keep = max(self._partial_match(buffer, stop) for stop in self.stops)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep], False

    @staticmethod
    def _partial_match(buffer: str, stop: str) -> int:
        """Length of the longest tail of ``buffer`` that is a proper prefix of ``stop``."""
        for length in range(min(len(stop) - 1, len(buffer)), 0, -1):
            if buffer.endswith(stop[:length]):
                return length
        return 0

    def flush(self) -> str:
        """The held-back tail when generation ends without a stop: it was ordinary text."""
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

    @property
    def matched_stop(self) -> str | None:
        return self._filter.matched

    def push(self, token_id: int) -> tuple[str, bool]:
        """Text to emit for this token, and whether a stop string ended the generation."""
        return self._filter.feed(self._detokenizer.add(token_id))

    def finish(self) -> str:
        """Everything still held back, when generation ends for another reason (length, EOS)."""
        if self._filter.stopped:
            return ""
        text, _ = self._filter.feed(self._detokenizer.flush())
        return text + self._filter.flush()
