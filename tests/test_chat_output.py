"""Generated text becomes answer text, reasoning and complete tool calls (``chat/output.py``).

The families are built from mlx-lm's own tool parsers, exactly as ``detect_family`` picks them.
"""

from __future__ import annotations

import importlib

import pytest

from mlxserve.chat.events import TextDelta, ThinkingDelta, ToolCallEvent
from mlxserve.chat.family import ModelFamily
from mlxserve.chat.output import OutputParser
from mlxserve.chat.tooling import call_format, forced_tools
from mlxserve.chat.types import Tool
from mlxserve.errors import InvalidRequestError

WEATHER = Tool(
    "get_weather",
    "The weather in a city",
    {"type": "object", "properties": {"city": {"type": "string"}}},
)
CLOCK = Tool("get_time", "The time", {"type": "object", "properties": {}})


def family(parser: str | None = None, thinks: bool = False) -> ModelFamily:
    fields = {}
    if parser:
        module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
        fields = {
            "tool_parser": module.parse_tool_call,
            "tool_call_start": module.tool_call_start,
            "tool_call_end": module.tool_call_end or None,
        }
    if thinks:
        fields.update(think_start="<think>", think_end="</think>")
    return ModelFamily(**fields)


def run(parser: OutputParser, *pieces: str) -> list:
    events = []
    for piece in pieces:
        events += parser.feed(piece)
    return events + parser.finish()


def text_of(events: list) -> str:
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def calls_of(events: list) -> list[tuple[str, dict]]:
    return [(e.call.name, e.call.arguments) for e in events if isinstance(e, ToolCallEvent)]


def test_a_hermes_call_is_emitted_as_soon_as_its_closing_tag_arrives():
    parser = OutputParser(family("json_tools"), [WEATHER])
    assert text_of(parser.feed("Let me check.<tool_")) == "Let me check."
    assert parser.feed('call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool') == []
    events = parser.feed("_call>")
    assert calls_of(events) == [("get_weather", {"city": "Paris"})]
    assert events[0].call.id.startswith("call_") and events[0].call.index == 0


def test_tags_never_reach_the_text():
    events = run(
        OutputParser(family("json_tools"), [WEATHER]),
        '<tool_call>{"name": "get_weather", "arguments": {"city": "Rome"}}</tool_call>',
    )
    assert text_of(events) == ""
    assert calls_of(events) == [("get_weather", {"city": "Rome"})]


def test_a_mistral_call_without_end_tag_is_parsed_when_the_output_ends():
    parser = OutputParser(family("mistral"), [WEATHER])
    events = run(parser, '[TOOL_CALLS][{"name": "get_weather", ', '"arguments": {"city": "Oslo"}}]')
    assert calls_of(events) == [("get_weather", {"city": "Oslo"})]
    assert text_of(events) == ""


def test_pythonic_calls_are_parsed():
    events = run(
        OutputParser(family("pythonic"), [WEATHER]),
        '<|tool_call_start|>[get_weather(city="Lima")]<|tool_call_end|>',
    )
    assert calls_of(events) == [("get_weather", {"city": "Lima"})]


def test_two_calls_get_increasing_indexes_and_the_whitespace_between_is_dropped():
    call = '<tool_call>{"name": "%s", "arguments": {}}</tool_call>'
    events = run(
        OutputParser(family("json_tools"), [WEATHER, CLOCK]),
        call % "get_weather",
        "\n",
        call % "get_time",
        "\n",
    )
    assert [e.call.index for e in events if isinstance(e, ToolCallEvent)] == [0, 1]
    assert text_of(events) == ""


def test_parallel_tool_calls_false_keeps_only_the_first_call():
    call = '<tool_call>{"name": "%s", "arguments": {}}</tool_call>'
    parser = OutputParser(family("json_tools"), [WEATHER, CLOCK], parallel_tool_calls=False)
    assert calls_of(run(parser, call % "get_weather", call % "get_time")) == [("get_weather", {})]


def test_an_unparseable_tool_segment_is_kept_as_text():
    events = run(OutputParser(family("json_tools"), [WEATHER]), "<tool_call>not json</tool_call>")
    assert calls_of(events) == []
    assert text_of(events) == "<tool_call>not json</tool_call>"


def test_without_tools_offered_tool_markup_is_plain_text():
    text = '<tool_call>{"name": "get_weather", "arguments": {}}</tool_call>'
    assert text_of(run(OutputParser(family("json_tools"), []), text)) == text


def test_reasoning_is_separated_and_the_answer_loses_its_leading_blank_lines():
    events = run(
        OutputParser(family(thinks=True), []),
        "<think>Paris is in",
        " France.</think>",
        "\n\nParis.",
    )
    assert "".join(e.text for e in events if isinstance(e, ThinkingDelta)) == "Paris is in France."
    assert text_of(events) == "Paris."


def test_a_prompt_that_opened_the_think_block_starts_in_reasoning():
    events = run(OutputParser(family(thinks=True), [], starts_in_reasoning=True), "hmm</think>Yes.")
    assert [type(e) for e in events] == [ThinkingDelta, TextDelta]
    assert text_of(events) == "Yes."


def test_a_call_can_follow_reasoning():
    events = run(
        OutputParser(family("json_tools", thinks=True), [WEATHER]),
        '<think>I need the weather.</think><tool_call>{"name": "get_weather", '
        '"arguments": {"city": "Bern"}}</tool_call>',
    )
    assert calls_of(events) == [("get_weather", {"city": "Bern"})]
    assert text_of(events) == ""


def test_constrained_output_is_one_call_and_no_text():
    events = run(
        OutputParser(family(), [WEATHER], constrained=True),
        '{"name": "get_weather", ',
        '"arguments": {"city": "Quito"}}',
    )
    assert calls_of(events) == [("get_weather", {"city": "Quito"})]
    assert text_of(events) == ""


def test_a_model_without_a_parser_answering_a_json_call_gives_a_call():
    events = run(
        OutputParser(family(), [WEATHER]), ' {"name": "get_weather", "arguments": {"city": "Kyiv"}}'
    )
    assert calls_of(events) == [("get_weather", {"city": "Kyiv"})]


def test_a_model_without_a_parser_answering_text_streams_it_at_once():
    parser = OutputParser(family(), [WEATHER])
    assert text_of(parser.feed("Sunny")) == "Sunny"


def test_json_that_names_no_offered_tool_stays_text():
    text = '{"name": "rm_rf", "arguments": {}}'
    events = run(OutputParser(family(), [WEATHER]), text)
    assert calls_of(events) == [] and text_of(events) == text


def test_a_named_tool_choice_constrains_to_that_tool_and_its_schema():
    schema = call_format(forced_tools([WEATHER, CLOCK], "get_time"), parallel=False)["schema"]
    assert schema["properties"]["name"] == {"const": "get_time"}
    assert schema["properties"]["arguments"] == {**CLOCK.parameters, "additionalProperties": False}


def test_a_forced_calls_objects_are_closed_to_their_declared_keys():
    """As LangChain's ``@tool`` writes a schema: no ``additionalProperties`` anywhere."""
    nested = Tool(
        "plan",
        parameters={
            "type": "object",
            "properties": {
                "steps": {
                    "type": "array",
                    "items": {"type": "object", "properties": {"title": {"type": "string"}}},
                },
                "meta": {"anyOf": [{"type": "object", "properties": {}}, {"type": "null"}]},
                "extra": {"type": "object", "additionalProperties": {"type": "string"}},
                "both": {"allOf": [{"properties": {"a": {}}}, {"properties": {"b": {}}}]},
            },
        },
    )
    arguments = call_format([nested], parallel=False)["schema"]["properties"]["arguments"]
    assert arguments["additionalProperties"] is False
    steps = arguments["properties"]["steps"]["items"]
    assert steps["additionalProperties"] is False
    assert arguments["properties"]["meta"]["anyOf"][0]["additionalProperties"] is False
    assert arguments["properties"]["extra"]["additionalProperties"] == {"type": "string"}
    assert all("additionalProperties" not in s for s in arguments["properties"]["both"]["allOf"])
    assert "additionalProperties" not in nested.parameters  # the tool itself is untouched


def test_a_forced_call_cut_short_is_no_text():
    parser = OutputParser(family(), [WEATHER], constrained=True)
    events = parser.feed('{"name": "get_weather", "arguments": {"ci')
    events += parser.finish(cut=True)
    assert events == []


def test_required_offers_every_tool():
    schema = call_format(forced_tools([WEATHER, CLOCK], "required"), parallel=False)["schema"]
    assert [o["properties"]["name"]["const"] for o in schema["anyOf"]] == [
        "get_weather",
        "get_time",
    ]


def test_a_tool_choice_naming_an_unknown_tool_is_refused():
    with pytest.raises(InvalidRequestError):
        forced_tools([WEATHER], "launch_rockets")


def test_a_tool_call_in_history_is_shown_as_text_for_a_template_without_tools():
    """A model whose template has no tools sees earlier calls as their JSON in the message's
    text, the message otherwise kept (its thinking, its images and where they sit)."""
    from mlxserve.chat.tooling import with_tool_preamble
    from mlxserve.chat.types import Message, Tool, ToolCall

    tool = Tool("get_weather", "The weather", {"type": "object", "properties": {}})
    call = ToolCall("get_weather", {"city": "Paris"})
    history = [
        Message("user", "Weather?"),
        Message("assistant", "Let me look. ", thinking="hm", tool_calls=[call], images=[b"x"]),
    ]
    history[1].image_at.append(3)
    shown = with_tool_preamble(history, [tool])
    assert shown[0].role == "system" and "get_weather" in shown[0].content
    assert shown[1] is history[0]
    said = shown[2]
    assert said.content == 'Let me look. {"name": "get_weather", "arguments": {"city": "Paris"}}'
    assert (said.role, said.thinking, said.images, said.image_at) == (
        "assistant",
        "hm",
        [b"x"],
        [3],
    )
    assert said.tool_calls == []
