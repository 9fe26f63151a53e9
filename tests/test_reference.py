"""The reference grammar: what it accepts, what it refuses, and that it round-trips."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from modelstore.errors import InvalidReferenceError
from modelstore.reference import parse_reference

DIGEST = "sha256:" + "a" * 64


@pytest.mark.parametrize(
    ("text", "host", "namespace", "name", "tag"),
    [
        ("smollm2", None, None, "smollm2", "latest"),
        ("smollm2:135m", None, None, "smollm2", "135m"),
        ("me/my-model:v1.0", None, "me", "my-model", "v1.0"),
        ("localhost:5000/me/model:q4", "localhost:5000", "me", "model", "q4"),
        ("registry.example.com/model", "registry.example.com", None, "model", "latest"),
        ("127.0.0.1:8080/ns/m:t", "127.0.0.1:8080", "ns", "m", "t"),
    ],
)
def test_accepts_the_documented_forms(text, host, namespace, name, tag):
    ref = parse_reference(text)
    assert (ref.host, ref.namespace, ref.name, ref.tag) == (host, namespace, name, tag)


def test_digest_is_kept():
    assert parse_reference(f"m:t@{DIGEST}").digest == DIGEST


@pytest.mark.parametrize(
    "text",
    [
        "",
        "..",
        "../etc/passwd",
        "/abs/path",
        "a/../b",
        "name\x00",
        "Upper",
        "a//b",
        "name:",
        "name:tag:extra",
        "a b",
        "a/b/c/d",
        "ns/sub/name",
        f"m@sha256:{'A' * 64}",
        f"m@sha256:{'a' * 63}",
        "m@md5:abc",
        "x" * 300,
        "m:" + "t" * 129,
        "-lead",
        "trail-",
        "nämé",
    ],
)
def test_rejects_bad_references_with_a_clear_error(text):
    with pytest.raises(InvalidReferenceError) as info:
        parse_reference(text)
    assert info.value.code == "invalid_reference"


def test_short_form_leaves_defaults_out():
    assert str(parse_reference("library/smollm2")) == "smollm2:latest"
    assert str(parse_reference("me/m:t")) == "me/m:t"


component = st.from_regex(r"[a-z0-9]{1,8}([._-][a-z0-9]{1,8}){0,2}", fullmatch=True)
namespace_component = st.from_regex(r"[a-z0-9]{1,8}([_-][a-z0-9]{1,8}){0,2}", fullmatch=True)
"""No dots: ``a.b/name`` names a registry host, as in Docker's grammar."""
tag = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)


@given(namespace=st.none() | namespace_component, name=component, tag=tag)
def test_valid_references_round_trip(namespace, name, tag):
    text = f"{namespace + '/' if namespace else ''}{name}:{tag}"
    ref = parse_reference(text)
    assert parse_reference(str(ref)) == ref


@given(st.text(max_size=80))
def test_any_text_parses_or_fails_cleanly_and_never_escapes(text):
    try:
        ref = parse_reference(text)
    except InvalidReferenceError:
        return
    for part in (ref.host_dir, ref.namespace_dir, ref.name, ref.tag):
        assert part not in {"", ".", ".."}
        assert "/" not in part and "\x00" not in part
