"""Records to text segments: raw text, instruction records, chat records.

A record becomes a list of ``(text, is_response)`` segments. Tokenization later marks the tokens of
response segments, so the loss can be taken on responses only. Templates are named, built in and
rendered here (or the tokenizer's own chat template): nothing in a sweep file is executed.
"""

from __future__ import annotations

from typing import Any

from harness.data.sources import Record
from harness.errors import DataError

Segments = list[tuple[str, bool]]

ALPACA_PROMPT = "### Instruction:\n{instruction}\n\n"
ALPACA_INPUT = "### Input:\n{input}\n\n"
ALPACA_RESPONSE = "### Response:\n"
ROLES = {"system", "user", "assistant"}


class Skip(Exception):
    """An empty or whitespace-only row: skipped and counted, not an error."""


def _text(record: Record, column: str, required: bool = True) -> str:
    value = record.fields.get(column)
    if value is None:
        if required:
            raise Skip
        return ""
    if not isinstance(value, str):
        raise DataError(f"{record.where}: column '{column}' holds {type(value).__name__} ({str(value)[:40]}), "
                        f"expected text; fix the row or map another column")
    return value


def render_text(record: Record, columns: dict[str, str]) -> Segments:
    text = _text(record, columns["text"])
    if not text.strip():
        raise Skip
    return [(text, True)]


def render_instruction(record: Record, columns: dict[str, str]) -> Segments:
    instruction = _text(record, columns["instruction"])
    output = _text(record, columns["output"])
    extra = _text(record, columns["input"], required=False)
    if not instruction.strip() or not output.strip():
        raise Skip
    prompt = ALPACA_PROMPT.format(instruction=instruction)
    if extra.strip():
        prompt += ALPACA_INPUT.format(input=extra)
    return [(prompt + ALPACA_RESPONSE, False), (output, True)]


def _messages(record: Record, column: str) -> list[dict[str, str]]:
    msgs = record.fields.get(column)
    if msgs is None or (isinstance(msgs, list) and not msgs):
        raise Skip
    if not isinstance(msgs, list):
        raise DataError(f"{record.where}: column '{column}' holds {type(msgs).__name__}, expected a list of "
                        f"{{role, content}} messages")
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise DataError(f"{record.where}: message {i} must be {{role: system|user|assistant, content: text}}, "
                            f"got {str(m)[:80]}")
    if not any(m["role"] == "assistant" for m in msgs):
        raise DataError(f"{record.where}: no assistant message to learn from")
    return msgs


def _chatml(msgs: list[dict[str, str]]) -> Segments:
    out: Segments = []
    for m in msgs:
        head = f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            out += [(head, False), (m["content"] + "<|im_end|>\n", True)]
        else:
            out.append((head + m["content"] + "<|im_end|>\n", False))
    return out


def _mistral(msgs: list[dict[str, str]]) -> Segments:
    out: Segments = []
    system = ""
    for m in msgs:
        if m["role"] == "system":
            system = m["content"] + "\n\n"
        elif m["role"] == "user":
            out.append((f"[INST] {system}{m['content']} [/INST]", False))
            system = ""
        else:
            out.append((m["content"], True))
    return out


def _tokenizer_template(tokenizer: Any, msgs: list[dict[str, str]]) -> Segments:
    # Render growing prefixes; each message's segment is what its prefix adds. Works for every
    # template that renders a conversation as the concatenation of its turns.
    out: Segments = []
    previous = ""
    for i, m in enumerate(msgs):
        rendered = tokenizer.apply_chat_template(msgs[: i + 1], tokenize=False)
        if not rendered.startswith(previous):
            raise DataError("the tokenizer's chat template does not render turns as a growing prefix; "
                            "set dataset.template to chatml or mistral")
        out.append((rendered[len(previous):], m["role"] == "assistant"))
        previous = rendered
    return out


CHAT_TEMPLATES = {"chatml": _chatml, "mistral": _mistral}


def render_chat(record: Record, columns: dict[str, str], template: str, tokenizer: Any) -> Segments:
    msgs = _messages(record, columns["messages"])
    if template == "auto":
        if getattr(tokenizer, "chat_template", None):
            return _tokenizer_template(tokenizer, msgs)
        template = "chatml"
    return CHAT_TEMPLATES[template](msgs)


def needed_columns(fmt: str, columns: dict[str, str]) -> list[str]:
    return {"text": [columns["text"]], "instruction": [columns["instruction"], columns["output"]],
            "chat": [columns["messages"]]}[fmt]


def usable(record: Record, fmt: str, columns: dict[str, str]) -> bool:
    """False for an empty or whitespace-only row, DataError naming a bad one, else True.

    Needs no tokenizer, so every row can be checked in file order before the validation split:
    empty rows then never count towards a split, and the first bad row is the one reported.
    """
    try:
        if fmt == "chat":
            _messages(record, columns["messages"])  # only the template needs a tokenizer
        else:
            render(record, fmt, columns, template="", tokenizer=None)
    except Skip:
        return False
    return True


def render(record: Record, fmt: str, columns: dict[str, str], template: str, tokenizer: Any) -> Segments:
    """Segments of one record; raises :class:`Skip` for an empty row, DataError for a bad one."""
    if fmt == "text":
        return render_text(record, columns)
    if fmt == "instruction":
        return render_instruction(record, columns)
    return render_chat(record, columns, template, tokenizer)
