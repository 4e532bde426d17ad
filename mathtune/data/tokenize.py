"""Conversations and documents -> token ids and labels, with the model's own chat template.

    ensure_chat_template(tokenizer, cfg.model.chat_template)
    train, eval = tokenize_splits(train_conv, eval_conv, tokenizer, cfg.data, report)

A conversation is rendered with the chat template and tokenized with labels on the assistant's turns
only: each turn's content and its end-of-turn token, never padding (IGNORE_INDEX elsewhere). Plain
text (data.format: text) is not templated: each document is tokenized and followed by the
end-of-text token, the documents are concatenated and cut into data.max_seq_length chunks, and every
token is trained (continued pre-training on your own material).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from mathtune.data.dataset import DataReport
from mathtune.data.template import render_chat
from mathtune.errors import DataError, MathtuneError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

    from mathtune.config import DataConfig


IGNORE_INDEX = -100

# Used only when the tokenizer has no chat template and the user names one (model.chat_template).
# "plain" ends each assistant turn with the EOS token so that a base model learns to stop.
BUILTIN_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    ),
    "plain": (
        "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}\n\n"
        "{% elif message['role'] == 'user' %}### Question:\n{{ message['content'] }}\n\n"
        "{% else %}### Answer:\n{{ message['content'] }}{{ eos_token }}\n\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}### Answer:\n{% endif %}"
    ),
}


def ensure_chat_template(tokenizer: PreTrainedTokenizerBase, fallback: str | None) -> None:
    """Keep the tokenizer's own template; otherwise install the configured fallback or explain."""
    if tokenizer.chat_template:
        return
    if fallback is None:
        raise MathtuneError(
            "The tokenizer has no chat template (a base model?). Set model.chat_template to 'plain' "
            "(### Question / ### Answer, ends answers with EOS), 'chatml', or a Jinja template of your own."
        )
    tokenizer.chat_template = BUILTIN_TEMPLATES.get(fallback, fallback)


def tokenize_conversation(
    messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, max_seq_length: int, train_on_inputs: bool = False
) -> dict[str, Any]:
    """Render with the chat template and tokenize; labels are IGNORE_INDEX outside assistant turns.

    Returns input_ids, labels and `truncated`. Labels are decided by character spans of the
    rendered text, not by token ids, so pad == eos (SmolLM2) cannot mask a real end of turn.
    """
    text = render_chat(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    if train_on_inputs:
        labels = list(ids)
    else:
        spans = assistant_spans(messages, tokenizer, text)
        labels = [tok if _inside(start, spans) else IGNORE_INDEX for tok, (start, _) in zip(ids, enc["offset_mapping"])]
    truncated = len(ids) > max_seq_length
    return {"input_ids": ids[:max_seq_length], "labels": labels[:max_seq_length], "truncated": truncated}


def assistant_spans(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[int, int]]:
    """Character spans of `text` that the assistant wrote, each with its end-of-turn marker.

    The usual way: render the conversation up to each assistant turn with the generation prompt;
    what the next render adds is that turn. Templates that rewrite earlier turns (Mistral's puts the
    system prompt into the last user turn) break that prefix property; then each reply is found by
    its content, extended over the EOS token that follows it.
    """
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = render_chat(tokenizer, messages[:i], add_generation_prompt=True)
        through = render_chat(tokenizer, messages[: i + 1])
        if not (text.startswith(through) and through.startswith(before)):
            return _spans_by_content(messages, tokenizer, text)
        spans.append(_trim(text, len(before), len(through)))
    return spans


def _spans_by_content(messages: list[dict[str, str]], tokenizer: PreTrainedTokenizerBase, text: str) -> list[tuple[int, int]]:
    spans, cursor = [], 0
    eos = tokenizer.eos_token or ""
    for message in messages:
        if message["role"] == "system":
            continue  # templates move the system prompt (Mistral: into the last user turn)
        content = message["content"].strip()
        at = text.find(content, cursor)
        if at < 0 and message["role"] == "user":
            continue  # a template may rewrite user text; only the replies must be found
        if at < 0:
            raise MathtuneError("The chat template changes the messages' text; cannot tell which tokens the assistant wrote. "
                                "Set data.train_on_inputs: true or model.chat_template to a simpler template.")
        cursor = at + len(content)
        if message["role"] == "assistant":
            rest = text[cursor:]
            if eos and rest.lstrip().startswith(eos):
                cursor += len(rest) - len(rest.lstrip()) + len(eos)
            spans.append((at, cursor))
    return spans


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    # The newline a template writes after the end-of-turn token is layout, not the assistant's.
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _inside(position: int, spans: list[tuple[int, int]]) -> bool:
    return any(start <= position < end for start, end in spans)


def tokenize_dataset(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, cfg: DataConfig,
                     report: DataReport) -> datasets.Dataset:
    """Tokenize every conversation; drop examples left with no trained token and count them."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        rows = [tokenize_conversation(m, tokenizer, cfg.max_seq_length, cfg.train_on_inputs) for m in batch["messages"]]
        return {key: [row[key] for row in rows] for key in ("input_ids", "labels", "truncated")}

    num_proc = cfg.num_proc or (1 if len(ds) < 20_000 else os.cpu_count())
    tokenized = ds.map(encode, batched=True, remove_columns=ds.column_names, num_proc=num_proc if num_proc > 1 else None,
                       desc="Tokenizing")
    report.truncated += sum(tokenized["truncated"])
    has_labels = [any(label != IGNORE_INDEX for label in labels) for labels in tokenized["labels"]]
    kept = tokenized.select([i for i, ok in enumerate(has_labels) if ok])
    report.dropped_no_labels += len(tokenized) - len(kept)
    return kept.remove_columns(["truncated"])


def tokenize_splits(
    train_conv: datasets.Dataset, eval_conv: datasets.Dataset, tokenizer: PreTrainedTokenizerBase,
    cfg: DataConfig, report: DataReport,
) -> tuple[datasets.Dataset, datasets.Dataset]:
    report.text = is_text(train_conv)
    if report.text:
        train, evaluation = (pack_documents(ds, tokenizer, cfg.max_seq_length) for ds in (train_conv, eval_conv))
    else:
        train = tokenize_dataset(train_conv, tokenizer, cfg, report)
        evaluation = tokenize_dataset(eval_conv, tokenizer, cfg, report)
    if len(train) == 0:
        raise DataError(["no training example has an assistant token within data.max_seq_length"])
    report.train_examples, report.eval_examples = len(train), len(evaluation)
    report.train_tokens = sum(map(len, train["input_ids"]))
    report.train_label_tokens = sum(sum(label != IGNORE_INDEX for label in labels) for labels in train["labels"])
    return train, evaluation


def is_text(ds: datasets.Dataset) -> bool:
    """Whether a loaded dataset holds plain-text documents rather than conversations."""
    return "text" in ds.column_names


def pack_documents(ds: datasets.Dataset, tokenizer: PreTrainedTokenizerBase, max_seq_length: int) -> datasets.Dataset:
    """Documents -> chunks of max_seq_length tokens, labels on every token.

    Each document is tokenized as the tokenizer does by default (with the BOS token where it adds
    one) and followed by the end-of-text token (the tokenizer's EOS), so the model learns where a
    document ends; the documents are concatenated and cut. Cutting is done per map batch of
    PACK_BATCH documents (as Transformers' run_clm does), so the last chunk of a batch may be
    shorter; it is kept, unless it is a single token, which predicts nothing."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise MathtuneError("The tokenizer has no end-of-text token (eos_token) to put between documents; "
                            "plain-text training needs one")

    def encode(batch: dict[str, list]) -> dict[str, list]:
        stream: list[int] = []
        for ids in tokenizer(batch["text"], add_special_tokens=True)["input_ids"]:
            stream += ids if ids and ids[-1] == eos else [*ids, eos]
        chunks = [stream[i:i + max_seq_length] for i in range(0, len(stream), max_seq_length)]
        chunks = [chunk for chunk in chunks if len(chunk) > 1]
        return {"input_ids": chunks, "labels": [list(chunk) for chunk in chunks]}

    return ds.map(encode, batched=True, batch_size=PACK_BATCH, remove_columns=ds.column_names, desc="Packing documents")


PACK_BATCH = 1000
