"""Record shapes -> one Conversation type.

Every input shape is parsed by a small function below into the same `Conversation`: an optional
system message, then user/assistant turns, ending on the assistant. A parser raises `RecordError`
naming the field that is wrong; the loader adds the file and line.

Shapes, detected from a record's keys (or named by `data.format`):

    alpaca             {"instruction": "Calcula 3/4 + 1/8.", "input": "", "output": "... \\boxed{\\frac{7}{8}}"}
    question_answer    {"question": "Natalia sold clips to 48 ...", "answer": "... #### 72"}        (GSM8K)
    prompt_completion  {"prompt": "What is 12*7?", "completion": "84"}
    query_response     {"query": "¿Cuánto es 2^10?", "response": "1024"}
    fields             any pair, with names given by data.fields: {prompt: pregunta, response: respuesta}
    messages           {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]} (OpenAI)
    sharegpt           {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}

Pair shapes take an optional "system" string. A string "topic" field is kept for per-topic reports.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

ROLES = ("system", "user", "assistant")
_SURROGATE = re.compile("[\ud800-\udfff]")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}

# key sets that identify a pair shape: (format, prompt key, response key, optional extra-input key)
PAIR_KEYS = {
    "alpaca": ("instruction", "output", "input"),
    "question_answer": ("question", "answer", None),
    "prompt_completion": ("prompt", "completion", None),
    "query_response": ("query", "response", None),
}


class RecordError(ValueError):
    """One record is not of the expected shape; `field` is its path inside the record."""

    def __init__(self, field: str, message: str):
        self.field = field
        super().__init__(f"{field}: {message}" if field else message)


@dataclass
class Conversation:
    messages: list[dict[str, str]]
    """[{"role": "system"|"user"|"assistant", "content": str}, ...]"""
    topic: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_row(self) -> dict[str, Any]:
        return {"messages": self.messages, "topic": self.topic}


def detect_format(record: Any) -> str | None:
    """The shape of one record from its keys, or None when no shape matches."""
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    for fmt, (prompt, response, _) in PAIR_KEYS.items():
        if prompt in record and response in record:
            return fmt
    return None


def parse_record(record: Any, fmt: str, fields: dict[str, str | None] | None = None) -> Conversation:
    """Parse one JSON value as `fmt`; raises RecordError naming the offending field."""
    if not isinstance(record, dict):
        raise RecordError("", f"expected a JSON object, got {_json_type(record)}")
    if fmt == "messages":
        conv = _parse_messages(record)
    elif fmt == "sharegpt":
        conv = _parse_sharegpt(record)
    elif fmt == "fields":
        assert fields is not None, "config validation guarantees data.fields with format: fields"
        conv = _parse_pair(record, fields["prompt"], fields["response"], fields.get("input"), fields.get("system"))
    elif fmt in PAIR_KEYS:
        prompt, response, extra = PAIR_KEYS[fmt]
        conv = _parse_pair(record, prompt, response, extra, "system")
    else:
        raise ValueError(f"unknown record format {fmt!r}")
    topic = record.get("topic")
    conv.topic = topic if isinstance(topic, str) and topic.strip() and not _SURROGATE.search(topic) else None
    validate_turns(conv.messages)
    return conv


def _parse_pair(record: dict, prompt_key: str, response_key: str, input_key: str | None, system_key: str | None) -> Conversation:
    prompt = _text(record, prompt_key)
    if input_key and record.get(input_key) not in (None, ""):
        prompt = f"{prompt}\n\n{_text(record, input_key)}"
    messages = []
    if system_key and record.get(system_key) not in (None, ""):
        messages.append({"role": "system", "content": _text(record, system_key)})
    messages.append({"role": "user", "content": prompt})
    messages.append({"role": "assistant", "content": _text(record, response_key)})
    return Conversation(messages)


def _parse_messages(record: dict) -> Conversation:
    return Conversation(_turns(record, "messages", "role", "content", lambda role: role if role in ROLES else None))


def _parse_sharegpt(record: dict) -> Conversation:
    return Conversation(_turns(record, "conversations", "from", "value", SHAREGPT_ROLES.get))


def _turns(record: dict, key: str, role_key: str, text_key: str, role_of: Callable[[Any], str | None]) -> list[dict]:
    turns = record.get(key)
    if not isinstance(turns, list):
        raise RecordError(key, f"expected a list of turns, got {_json_type(turns)}")
    if not turns:
        raise RecordError(key, "is empty")
    messages = []
    for i, turn in enumerate(turns):
        where = f"{key}[{i}]"
        if not isinstance(turn, dict):
            raise RecordError(where, f"expected an object with '{role_key}' and '{text_key}', got {_json_type(turn)}")
        raw_role = turn.get(role_key)
        role = role_of(raw_role) if isinstance(raw_role, str) else None
        if role is None:
            accepted = ", ".join(SHAREGPT_ROLES if key == "conversations" else ROLES)
            raise RecordError(f"{where}.{role_key}", f"unknown role {raw_role!r}; expected one of {accepted}")
        messages.append({"role": role, "content": _text(turn, text_key, where)})
    return messages


def validate_turns(messages: list[dict[str, str]]) -> None:
    """An optional system message first, then user/assistant alternating, ending on the assistant."""
    body = messages[1:] if messages and messages[0]["role"] == "system" else messages
    offset = len(messages) - len(body)
    if not body:
        raise RecordError("", "has no user or assistant turn")
    for i, message in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if message["role"] != expected:
            problem = "a system message is only allowed first" if message["role"] == "system" else (
                f"two {message['role']} turns in a row" if i else "the first turn must be the user's"
            )
            raise RecordError(f"turn {i + offset}", f"expected a {expected} turn here: {problem}")
    if body[-1]["role"] != "assistant":
        raise RecordError(f"turn {len(messages) - 1}", "the conversation ends on the user; the last turn must be the assistant's")


def _text(record: dict, key: str, where: str = "") -> str:
    path = f"{where}.{key}" if where else key
    if key not in record:
        present = ", ".join(sorted(map(str, record))) or "none"
        raise RecordError(path, f"missing (keys present: {present})")
    value = record[key]
    if not isinstance(value, str):
        raise RecordError(path, f"expected text, got {_json_type(value)}")
    if not value.strip():
        raise RecordError(path, "is empty")
    bad = _SURROGATE.search(value)
    if bad:  # JSON can escape one ("\ud83d" without its pair); no text file, tokenizer or Arrow table can hold it
        raise RecordError(path, f"holds an unpaired UTF-16 surrogate (\\u{ord(bad.group()):04x}) at character "
                                f"{bad.start() + 1}: not valid Unicode; the record was cut in the middle of an emoji?")
    return value


def _json_type(value: Any) -> str:
    names = {dict: "an object", list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}
    return "null" if value is None else names.get(type(value), type(value).__name__)
