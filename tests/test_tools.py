"""Tool calls in generated text become structured calls."""

from __future__ import annotations

from mlxserve.server.tools import parse_tool_calls

WEATHER = [{"type": "function", "function": {"name": "get_weather", "parameters": {}}}]


def test_tagged_calls_are_parsed_and_removed_from_the_text():
    text = 'Let me check.<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' \
           "</tool_call>"
    rest, calls = parse_tool_calls(text, WEATHER)
    assert rest == "Let me check."
    assert [(c.name, c.arguments) for c in calls] == [("get_weather", {"city": "Paris"})]


def test_a_bare_json_call_is_parsed():
    _, calls = parse_tool_calls('{"name": "get_weather", "parameters": {"city": "Rome"}}',
                                WEATHER)
    assert calls[0].arguments == {"city": "Rome"}


def test_string_arguments_are_decoded_to_an_object():
    _, calls = parse_tool_calls(
        '<tool_call>{"name": "get_weather", "arguments": "{\\"city\\": \\"Oslo\\"}"}</tool_call>',
        WEATHER,
    )
    assert calls[0].arguments == {"city": "Oslo"}


def test_unknown_tools_and_plain_text_are_not_calls():
    assert parse_tool_calls('{"name": "rm_rf", "arguments": {}}', WEATHER)[1] == []
    assert parse_tool_calls("Paris is sunny.", WEATHER) == ("Paris is sunny.", [])


def test_without_tools_nothing_is_parsed():
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert parse_tool_calls(text, None) == (text, [])
