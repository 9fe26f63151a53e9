"""Streaming text: stop strings never leak, multi-byte characters are never split."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mlxserve.runners.textstream import (
    ByteDetokenizer,
    StopStringFilter,
    TextStream,
)


def feed_all(stops: list[str], pieces: list[str]) -> tuple[str, bool]:
    """What a client would see from ``pieces``: emitted text (plus flush), and whether stopped."""
    text_filter = StopStringFilter(stops)
    out = []
    for piece in pieces:
        text, stopped = text_filter.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + text_filter.flush(), False


def byte_stream(text: str, stops: list[str] | None = None) -> tuple[TextStream, list[int]]:
    """A stream over a vocabulary of the 256 single bytes: the worst case for splitting."""
    stream = TextStream(ByteDetokenizer(lambda ids: bytes(ids)), stops or [])
    return stream, list(text.encode())


def test_stop_string_spanning_three_tokens_does_not_leak() -> None:
    text_filter = StopStringFilter(["</stop>"])
    emitted = [text_filter.feed(piece) for piece in ["answer</", "st", "op>"]]
    assert emitted == [("answer", False), ("", False), ("", True)]


def test_text_before_the_stop_string_is_emitted() -> None:
    assert feed_all(["STOP"], ["hello wor", "ld ST", "OP and more"]) == ("hello world ", True)


def test_without_a_stop_flush_returns_the_held_text() -> None:
    text_filter = StopStringFilter(["</s>"])
    assert text_filter.feed("done </") == ("done ", False)
    assert text_filter.flush() == "</"


def test_partial_match_that_breaks_off_is_released() -> None:
    assert feed_all(["###"], ["a#", "#b"]) == ("a##b", False)


def test_earliest_of_several_stop_strings_wins() -> None:
    assert feed_all(["world", "lo w", "zzz"], ["hello world"]) == ("hel", True)


def test_no_stop_strings_passes_text_straight_through() -> None:
    assert StopStringFilter([]).feed("abc</") == ("abc</", False)


def test_after_a_stop_nothing_more_is_emitted() -> None:
    text_filter = StopStringFilter(["x"])
    assert text_filter.feed("axb") == ("a", True)
    assert text_filter.feed("more") == ("", True)
    assert text_filter.flush() == ""


@given(
    before=st.text(),
    stop=st.text(min_size=1, max_size=8),
    after=st.text(),
    cuts=st.lists(st.integers(min_value=0), max_size=12),
)
def test_random_splits_emit_exactly_the_prefix_before_the_stop(
    before: str, stop: str, after: str, cuts: list[int]
) -> None:
    whole = before + stop + after
    positions = sorted({cut % (len(whole) + 1) for cut in cuts})
    pieces = [whole[a:b] for a, b in zip([0, *positions], [*positions, len(whole)], strict=True)]
    emitted, stopped = feed_all([stop], pieces)
    assert stopped
    assert stop not in emitted
    assert emitted == whole[: whole.find(stop)]


def test_multibyte_characters_are_never_emitted_half_way() -> None:
    text = "café 日本 🙂!"
    stream, ids = byte_stream(text)
    pieces = [stream.push(token_id)[0] for token_id in ids]
    for piece in pieces:
        piece.encode("utf-8")  # a lone surrogate or U+FFFD would mean a split character
        assert "\ufffd" not in piece
    assert "".join(pieces) + stream.finish() == text
    assert "🙂" in pieces


def test_stop_string_after_multibyte_text_cuts_cleanly() -> None:
    stream, ids = byte_stream("日本<|end|>tail", ["<|end|>"])
    out = []
    for token_id in ids:
        text, stopped = stream.push(token_id)
        out.append(text)
        if stopped:
            break
    assert stream.stopped
    assert "".join(out) == "日本"
    assert stream.finish() == ""


def test_truncated_character_at_the_end_becomes_a_replacement() -> None:
    stream, ids = byte_stream("ok🙂")
    pieces = [stream.push(token_id)[0] for token_id in ids[:-1]]
    assert "".join(pieces) == "ok"
    assert stream.finish() == "\ufffd"
