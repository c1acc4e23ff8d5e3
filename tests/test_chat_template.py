"""The chat template (tokenizer_config.json) against hand-written official RWKV-7 G1 renderings."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tokenization_rwkv7 import RWKV7Tokenizer  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return RWKV7Tokenizer.from_pretrained(str(ROOT))


def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"type": "string"}},
                       "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
]


def test_single_turn(tok):
    m = [{"role": "user", "content": "Hello"}]
    assert render(tok, m, add_generation_prompt=True) == "User: Hello\n\nAssistant:"
    assert render(tok, m) == "User: Hello\n\n"


def test_multi_turn_and_system(tok):
    m = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": " Hello! "}, {"role": "user", "content": "Bye"}]
    assert render(tok, m, add_generation_prompt=True) == (
        "System: Be brief.\n\nUser: Hi\n\nAssistant: Hello!\n\nUser: Bye\n\nAssistant:")


def test_blank_lines_and_crlf_are_cleaned(tok):
    m = [{"role": "system", "content": "\r\nline1\r\n\r\n\r\nline2\n"},
         {"role": "user", "content": "  a\n\n\n\nb\r\nc\n\n"},
         {"role": "assistant", "content": "x\n\n\ny"}]
    assert render(tok, m) == "System: line1\nline2\n\nUser: a\nb\nc\n\nAssistant: x\ny\n\n"
    long_run = "a" + "\n" * 5000 + "b"
    assert render(tok, [{"role": "user", "content": long_run}]) == "User: a\nb\n\n"


def test_thinking(tok):
    m = [{"role": "user", "content": "Why?"}]
    assert render(tok, m, add_generation_prompt=True, enable_thinking=True) == "User: Why?\n\nAssistant: <think"
    assert render(tok, m, add_generation_prompt=True, enable_thinking=False) == (
        "User: Why?\n\nAssistant: <think>\n</think")
    assert render(tok, m, add_generation_prompt=True) == "User: Why?\n\nAssistant:"


def test_tools_and_tool_outputs(tok):
    m = [{"role": "user", "content": "Weather in Paris?"}]
    sys_part = ("System: Tools:\n- get_weather(city, unit): Get the current weather.\n- now()\n"
                "Return only a JSON function call.\n\n")
    assert render(tok, m, tools=TOOLS, add_generation_prompt=True) == (
        sys_part + "User: Weather in Paris?\n\nAssistant: ```json\n")
    m2 = m + [
        {"role": "assistant", "tool_calls": [{"type": "function", "function": {
            "name": "get_weather", "arguments": {"city": "Paris"}}}]},
        {"role": "tool", "content": '{"temp": 21}'},
    ]
    assert render(tok, m2, tools=TOOLS, add_generation_prompt=True) == (
        sys_part + "User: Weather in Paris?\n\n"
        'Assistant: ```json\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n```\n\n'
        'User: Function output:\n{"temp": 21}\n\nAssistant:')
    with_system = [{"role": "system", "content": "You help."}] + m
    assert render(tok, with_system, tools=TOOLS, add_generation_prompt=True).startswith(
        "System: You help.\nTools:\n- get_weather(city, unit)")


def test_tokenized_chat_matches_text(tok):
    m = [{"role": "user", "content": "中文 <|endoftext|>"}]
    ids = tok.apply_chat_template(m, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    assert ids == tok.encode("User: 中文 <|endoftext|>\n\nAssistant:")
    assert 0 not in ids
