"""Record shapes -> one Conversation type (or a Document, for plain text).

Every input shape is parsed by a small function below into the same `Conversation`: an optional
system message, then user/assistant turns, ending on the assistant. A parser raises `RecordError`
naming the field that is wrong; the loader adds the file and line (or row).

Shapes, detected from a record's keys (or named by `data.format`):

    alpaca             {"instruction": "Calcula 3/4 + 1/8.", "input": "", "output": "... \\boxed{\\frac{7}{8}}"}
    question_answer    {"question": "Natalia sold clips to 48 ...", "answer": "... #### 72"}        (GSM8K)
    prompt_completion  {"prompt": "What is 12*7?", "completion": "84"}
    query_response     {"query": "¿Cuánto es 2^10?", "response": "1024"}
    fields             any pair, with names given by data.fields: {prompt: pregunta, response: respuesta}
    messages           {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", ...}]} (OpenAI)
    sharegpt           {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", ...}]}
    preference         {"prompt": "¿Cuánto es 7·8?", "chosen": "56", "rejected": "54"}   (DPO; the chosen side)
    text               {"text": "Una fracción representa partes de un todo ..."}          (a Document)

Pair shapes take an optional "system" string. A string "topic" field is kept for per-topic reports.
A message's content may be OpenAI content parts, [{"type": "text", "text": "..."}]: the text parts
are joined with a line break, as vLLM's OpenAI server does. A boolean "label" (or "kto_tag") is a
KTO-style desirability mark, kept in `desirable` for the loader to act on.

Refused with their place, never dropped from inside a conversation: images, audio and video (parts,
an `<image>` placeholder, an "images" key), tool turns and tool calls, tool definitions.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")
_SURROGATE = re.compile("[\ud800-\udfff]")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
TOOL_ROLES = ("tool", "function", "ipython", "function_call", "observation")
MEDIA_KEYS = ("images", "image", "videos", "video", "audios", "audio")
TOOL_KEYS = ("tools", "functions")
REFUSED_KEYS = frozenset(MEDIA_KEYS + TOOL_KEYS)
UNSUPPORTED = "mathtune trains on text only; set data.on_invalid: skip to leave such records out"

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
    desirable: bool | None = None
    """A KTO-style label: False marks an example of what not to answer; None when unlabelled."""
    rejected: list[dict[str, str]] | None = None
    """A preference pair's rejected side: the same prompt with the rejected answer (DPO)."""

    def to_row(self, pairs: bool = False) -> dict[str, Any]:
        """The dataset row; with `pairs` (DPO) also the rejected side."""
        return {"messages": self.messages, "topic": self.topic, **({"rejected": self.rejected} if pairs else {})}


@dataclass
class Document:
    """A plain-text document (data.format: text): no chat template, every token trained."""

    text: str
    topic: str | None = None
    desirable: bool | None = None

    def to_row(self) -> dict[str, Any]:
        return {"text": self.text, "topic": self.topic}


def detect_format(record: Any) -> str | None:
    """The shape of one record from its keys, or None when no shape matches."""
    if not isinstance(record, dict):
        return None
    if "chosen" in record and "rejected" in record:
        return "preference"
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        return "sharegpt"
    for fmt, (prompt, response, _) in PAIR_KEYS.items():
        if prompt in record and response in record:
            return fmt
    if "text" in record:
        return "text"
    return None


def parse_record(record: Any, fmt: str, fields: dict[str, str | None] | None = None) -> Conversation | Document:
    """Parse one JSON value as `fmt`; raises RecordError naming the offending field."""
    if not isinstance(record, dict):
        raise RecordError("", f"expected a JSON object, got {_json_type(record)}")
    _refuse_media_and_tools(record)
    if fmt == "text":
        conv: Conversation | Document = Document(_text(record, "text"))
    elif fmt == "messages":
        conv = Conversation(_turns(record, "messages"))
    elif fmt == "sharegpt":
        conv = Conversation(_turns(record, "conversations"))
    elif fmt == "preference":
        conv = _parse_preference(record)
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
    conv.desirable = _desirable(record)
    if isinstance(conv, Conversation):
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


# A preference record's prompt, when the chosen answer is a string: (prompt key, extra-input key)
PREFERENCE_PROMPTS = (("prompt", None), ("instruction", "input"), ("question", None), ("query", None))


def _parse_preference(record: dict) -> Conversation:
    """The prompt with its chosen answer (`messages`) and with its rejected one (`rejected`).

        {"prompt": "¿Cuánto es 7·8?", "chosen": "7·8 = 56", "rejected": "7·8 = 54"}                (TRL)
        {"chosen": [{"role": "user", ...}, {"role": "assistant", ...}], "rejected": [...]}         (TRL, conversational)
        {"conversations": [{"from": "human", ...}], "chosen": {"from": "gpt", ...}, "rejected": {...}}  (LLaMA-Factory)
    """
    chosen = _preference_side(record, "chosen")
    rejected = _preference_side(record, "rejected")
    validate_turns(rejected, "rejected")
    return Conversation(chosen, rejected=rejected)


def _preference_side(record: dict, key: str) -> list[dict[str, str]]:
    """The whole conversation that ends with `key`'s answer (chosen or rejected)."""
    if key not in record:  # a file's shape is its first record's: a later one may lack the pair
        raise RecordError(key, f"missing (keys present: {', '.join(sorted(map(str, record)))}): a preference pair "
                               "has chosen and rejected answers")
    answer = record[key]
    history = next((name for name in ("prompt", "messages", "conversations") if isinstance(record.get(name), list)), None)
    if isinstance(answer, str):
        prompt = next(((name, extra) for name, extra in PREFERENCE_PROMPTS if isinstance(record.get(name), str)), None)
        if prompt is not None:
            return _parse_pair(record, prompt[0], key, prompt[1], "system").messages
        if history is None:
            raise RecordError(key, "an answer without a prompt: expected a prompt (or instruction, question, "
                                   "query) field, or chosen and rejected as lists of messages")
        return [*_turns(record, history), {"role": "assistant", "content": _text(record, key)}]
    if isinstance(answer, dict):
        turns = [_turn(answer, key, _turn_keys([answer]))]
    elif isinstance(answer, list):
        turns = _turns(record, key)
    else:
        raise RecordError(key, f"expected text, a message or a list of messages, got {_json_type(answer)}")
    return [*(_turns(record, history) if history else []), *turns]


def _turn_keys(turns: list) -> tuple[str, str, Callable[[Any], str | None]]:
    """(role key, text key, role reader) of a list of turns: ShareGPT's from/value or OpenAI's role/content."""
    first = turns[0] if turns else None
    return SHAREGPT_KEYS if isinstance(first, dict) and "from" in first else OPENAI_KEYS


SHAREGPT_KEYS = ("from", "value", SHAREGPT_ROLES.get)
OPENAI_KEYS = ("role", "content", lambda role: role if role in ROLES else None)


def _turns(record: dict, key: str) -> list[dict]:
    turns = record.get(key)
    if not isinstance(turns, list):
        raise RecordError(key, f"expected a list of turns, got {_json_type(turns)}")
    if not turns:
        raise RecordError(key, "is empty")
    keys = SHAREGPT_KEYS if key == "conversations" else OPENAI_KEYS if key == "messages" else _turn_keys(turns)
    role_key, text_key, role_of = keys
    messages = []
    for i, turn in enumerate(turns):
        # The usual turn, {"role": "user", "content": "some text"}, is taken as it is; any other goes
        # through _turn, which names what is wrong. (Checking a million records stays fast.)
        raw_role = turn.get(role_key) if type(turn) is dict else None
        role = role_of(raw_role) if type(raw_role) is str else None
        content = turn.get(text_key) if role else None
        if (type(content) is str and content.strip() and "<image>" not in content and "tool_calls" not in turn
                and "function_call" not in turn):
            messages.append({"role": role, "content": content})
        else:
            messages.append(_turn(turn, f"{key}[{i}]", keys))
    return messages


def _turn(turn: Any, where: str, keys: tuple[str, str, Callable[[Any], str | None]]) -> dict[str, str]:
    role_key, text_key, role_of = keys
    if not isinstance(turn, dict):
        raise RecordError(where, f"expected an object with '{role_key}' and '{text_key}', got {_json_type(turn)}")
    raw_role = turn.get(role_key)
    if raw_role in TOOL_ROLES:
        raise RecordError(f"{where}.{role_key}", f"a '{raw_role}' turn: tool calls and results are not supported; {UNSUPPORTED}")
    role = role_of(raw_role) if isinstance(raw_role, str) else None
    if role is None:
        accepted = ", ".join(SHAREGPT_ROLES if role_key == "from" else ROLES)
        raise RecordError(f"{where}.{role_key}", f"unknown role {raw_role!r}; expected one of {accepted}")
    if "tool_calls" in turn or "function_call" in turn:
        call = "tool_calls" if turn.get("tool_calls") else "function_call" if turn.get("function_call") else None
        if call:
            raise RecordError(f"{where}.{call}", f"tool calls are not supported; {UNSUPPORTED}")
    value = turn.get(text_key)
    content = _parts(value, f"{where}.{text_key}") if isinstance(value, list) else _text(turn, text_key, where)
    if "<image>" in content:
        raise RecordError(f"{where}.{text_key}", f"an <image> placeholder: conversations with images are not supported; "
                                                 f"{UNSUPPORTED}")
    return {"role": role, "content": content}


TEXT_PARTS = ("text", "input_text", "output_text")


def _parts(parts: list, where: str) -> str:
    """OpenAI content parts -> one text; a part that is not text is refused with its place."""
    if not parts:
        raise RecordError(where, "is empty")
    texts = []
    for j, part in enumerate(parts):
        place = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise RecordError(place, f"expected a content part such as {{\"type\": \"text\", \"text\": ...}}, "
                                     f"got {_json_type(part)}")
        kind = part.get("type", "text" if "text" in part else None)
        if kind not in TEXT_PARTS:
            what = f"'{kind}' parts" if isinstance(kind, str) else "parts without a type"
            raise RecordError(f"{place}.type", f"{what} are not supported (images, audio, files); {UNSUPPORTED}")
        texts.append(_text(part, "text", place))
    return "\n".join(texts)


def _refuse_media_and_tools(record: dict) -> None:
    if record.keys().isdisjoint(REFUSED_KEYS):
        return
    for key in MEDIA_KEYS:
        if record.get(key):
            raise RecordError(key, f"records with {key} are not supported; {UNSUPPORTED}")
    for key in TOOL_KEYS:
        if record.get(key):
            raise RecordError(key, f"tool definitions are not supported; {UNSUPPORTED}")


def _desirable(record: dict) -> bool | None:
    """A KTO-style label: true/false (also as text, from a CSV cell); None when the record has none."""
    if "label" not in record and "kto_tag" not in record:
        return None
    for key in ("label", "kto_tag"):
        value = record.get(key)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            value = value.strip().lower() == "true"
        if isinstance(value, bool):
            return value
    return None


def validate_turns(messages: list[dict[str, str]], where: str = "") -> None:
    """An optional system message first, then user/assistant alternating, ending on the assistant.
    `where` names the conversation inside the record (a preference pair's "rejected")."""
    try:
        _check_turns(messages)
    except RecordError as exc:
        if not where:
            raise
        raise RecordError(f"{where} {exc.field}" if exc.field else where, str(exc).removeprefix(f"{exc.field}: ")) from None


def _check_turns(messages: list[dict[str, str]]) -> None:
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
