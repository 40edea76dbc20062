"""Chat datasets: load, validate, tokenize with response masks.

A training example is a chat: every message before the last is the *prompt*, the last message is
the assistant *response* being attributed. Rows come from JSONL (``{"messages": [...], ...}``) or
from Parquet/CSV with ``prompt``/``response`` columns (and an optional ``system`` column). Every
other field is kept as metadata; ``data_origin`` is the ground-truth label when it exists.

Truncation policy (``encode_example``): the response is kept whole and the prompt is trimmed from
the left until the example fits ``max_length``; only when the response alone is longer than
``max_length`` is the response cut from the right. Both cases are counted and reported.
"""
from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from . import paths

MAX_REPORTED_ERRORS = 20
ROLES = ("system", "user", "assistant", "tool")


class DatasetError(ValueError):
    """Raised when rows of a dataset file are invalid; lists every bad row (up to a cap)."""

    def __init__(self, path: str, problems: list[tuple[int, str]], n_bad: int):
        self.path = str(path)
        self.problems = problems
        self.n_bad = n_bad
        lines = [f"{self.path}:{line}: {msg}" for line, msg in problems]
        more = n_bad - len(problems)
        if more > 0:
            lines.append(f"... and {more} more bad rows")
        lines.append(
            "Fix these rows, or load with skip_invalid=True (CLI: --skip-invalid) to drop them."
        )
        super().__init__(f"{n_bad} invalid row(s) in {self.path}:\n" + "\n".join(lines))


@dataclass
class ChatExample:
    """One training example: ``messages[:-1]`` is the prompt, ``messages[-1]`` the response."""

    messages: list[dict[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    @property
    def prompt_messages(self) -> list[dict[str, str]]:
        return self.messages[:-1]

    @property
    def response(self) -> str:
        return self.messages[-1]["content"]

    @property
    def prompt_text(self) -> str:
        """The prompt as plain text (last user turn), for display."""
        users = [m["content"] for m in self.prompt_messages if m["role"] == "user"]
        return users[-1] if users else ""

    @property
    def system(self) -> str | None:
        systems = [m["content"] for m in self.prompt_messages if m["role"] == "system"]
        return systems[0] if systems else None

    @property
    def label(self) -> str | None:
        value = self.metadata.get("data_origin")
        return None if value is None else str(value)

    def to_row(self) -> dict[str, Any]:
        return {"messages": self.messages, **self.metadata}


@dataclass
class ChatDataset:
    """A loaded dataset: its examples in file order, where they came from, what was skipped."""

    examples: list[ChatExample]
    path: str = ""
    n_skipped: int = 0
    skipped: list[tuple[int, str]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> ChatExample:
        return self.examples[i]

    def __iter__(self) -> Iterator[ChatExample]:
        return iter(self.examples)

    @property
    def labels(self) -> list[str | None]:
        return [ex.label for ex in self.examples]

    def label_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for label in self.labels:
            key = "unlabelled" if label is None else label
            counts[key] = counts.get(key, 0) + 1
        return counts

    def subset(self, indices: Sequence[int]) -> "ChatDataset":
        return ChatDataset([self.examples[i] for i in indices], path=self.path)


def validate_row(row: Any) -> list[dict[str, str]]:
    """Check one parsed row and return its messages; raise ValueError saying what to fix."""
    if not isinstance(row, dict):
        raise ValueError(f"row is a {type(row).__name__}, expected a JSON object with 'messages'")
    if "messages" not in row:
        raise ValueError("row has no 'messages' field; add a list of {role, content} messages")
    messages = row["messages"]
    if not isinstance(messages, list) or not messages:
        raise ValueError("'messages' must be a non-empty list of {role, content} objects")
    for j, msg in enumerate(messages):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise ValueError(f"message {j} must be an object with 'role' and 'content'")
        if msg["role"] not in ROLES:
            raise ValueError(f"message {j} has role {msg['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(msg["content"], str):
            raise ValueError(
                f"message {j} content is {type(msg['content']).__name__}, expected a string"
            )
    if messages[-1]["role"] != "assistant":
        raise ValueError(
            f"last message has role {messages[-1]['role']!r}; the last turn must be the "
            "assistant response being attributed"
        )
    if not messages[-1]["content"].strip():
        raise ValueError("the assistant response (last message) is empty")
    if len(messages) < 2:
        raise ValueError("no prompt: add at least one user message before the assistant response")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


# Byte-order marks of the encodings a text file is most often saved in by mistake (UTF-32 first:
# its little-endian mark starts with UTF-16's).
_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32"), (b"\x00\x00\xfe\xff", "UTF-32"),
         (b"\xff\xfe", "UTF-16"), (b"\xfe\xff", "UTF-16"))


def read_text(path: str | os.PathLike) -> str:
    """The contents of a UTF-8 text file a user gave (a dataset, queries, questions): every user
    text file is read here. A UTF-8 byte-order mark is dropped. Anything else that is not UTF-8
    is refused with the file's name, what it is instead (UTF-16/UTF-32 from its byte-order mark,
    binary when it holds NUL bytes) and the command that converts it."""
    path = Path(path)
    raw = path.read_bytes()
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        bad = err.start
    converted = f"{path.stem}.utf8{path.suffix}"
    for bom, encoding in _BOMS:
        if raw.startswith(bom):
            raise ValueError(
                f"{path} is not UTF-8 text: it is {encoding} (it starts with a {encoding} "
                f"byte-order mark). Convert it with `iconv -f {encoding} -t UTF-8 {path} > "
                f"{converted}` and pass {converted}")
    line = raw.count(b"\n", 0, bad) + 1
    if b"\x00" in raw[:8192]:
        raise ValueError(
            f"{path} is not UTF-8 text: it holds binary data (NUL bytes; byte 0x{raw[bad]:02x} at "
            f"line {line} cannot be read). Pass the text file itself, or export it as UTF-8 text")
    raise ValueError(
        f"{path} is not UTF-8 text: byte 0x{raw[bad]:02x} on line {line} cannot be read as UTF-8. "
        f"Convert it from the encoding it was saved in, e.g. `iconv -f LATIN1 -t UTF-8 {path} > "
        f"{converted}`, and pass {converted}")


def _rows_from_jsonl(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    # Lines end at \n, \r\n or \r as when reading the file directly; str.splitlines would also cut
    # at U+2028 and other separators that JSON strings may hold.
    for lineno, text in enumerate(io.StringIO(read_text(path), newline=None), start=1):
        if not text.strip():
            continue
        try:
            yield lineno, json.loads(text), None
        except json.JSONDecodeError as err:
            yield lineno, None, f"malformed JSON ({err.msg} at column {err.colno})"


def _rows_from_table(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    import pandas as pd

    frame = (pd.read_parquet(path) if path.suffix == ".parquet"
             else pd.read_csv(io.StringIO(read_text(path))))
    missing = {"prompt", "response"} - set(frame.columns)
    if missing:
        raise DatasetError(
            str(path),
            [(1, f"missing column(s) {sorted(missing)}; a table needs 'prompt' and 'response'")],
            1,
        )
    # CSV/Parquet rows are numbered like a spreadsheet: header is line 1.
    for offset, record in enumerate(frame.to_dict(orient="records")):
        messages = []
        system = record.pop("system", None)
        if isinstance(system, str) and system:
            messages.append({"role": "system", "content": system})
        messages.append({"role": "user", "content": _cell(record.pop("prompt"))})
        messages.append({"role": "assistant", "content": _cell(record.pop("response"))})
        meta = {k: v for k, v in record.items() if not _is_missing(v)}
        yield offset + 2, {"messages": messages, **meta}, None


def _cell(value: Any) -> Any:
    return "" if _is_missing(value) else value


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def load_dataset(
    path: str | os.PathLike,
    skip_invalid: bool = False,
    max_reported: int = MAX_REPORTED_ERRORS,
) -> ChatDataset:
    """Load a chat dataset from ``.jsonl``, ``.parquet`` or ``.csv``.

    Every invalid row is collected; unless ``skip_invalid`` the load fails with a
    :class:`DatasetError` listing them (first ``max_reported``) with line numbers.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"dataset file not found: {path}; check the path")
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        rows = _rows_from_jsonl(path)
    elif suffix in (".parquet", ".csv"):
        rows = _rows_from_table(path)
    else:
        raise ValueError(f"unsupported dataset format {suffix!r} for {path}; use .jsonl, .parquet or .csv")

    examples: list[ChatExample] = []
    problems: list[tuple[int, str]] = []
    n_bad = 0
    for lineno, row, parse_error in rows:
        try:
            if parse_error:
                raise ValueError(parse_error)
            messages = validate_row(row)
        except ValueError as err:
            n_bad += 1
            if len(problems) < max_reported:
                problems.append((lineno, str(err)))
            continue
        meta = {k: v for k, v in row.items() if k != "messages"}
        examples.append(ChatExample(messages=messages, metadata=meta, line=lineno))
    if n_bad and not skip_invalid:
        raise DatasetError(str(path), problems, n_bad)
    if not examples:
        raise DatasetError(str(path), [(0, "the file holds no valid rows")], max(n_bad, 1))
    return ChatDataset(examples, path=str(path), n_skipped=n_bad, skipped=problems)


def write_jsonl(examples: Iterable[ChatExample | dict], path: str | os.PathLike) -> int:
    """Write examples (or raw rows) as JSONL; returns the number of rows written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    tmp = paths.temp_for(path)
    with open(tmp, "w", encoding="utf-8") as fh:
        for ex in examples:
            row = ex.to_row() if isinstance(ex, ChatExample) else ex
            fh.write(json.dumps(row, ensure_ascii=False, sort_keys=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


# ---------------------------------------------------------------- tokenization


@dataclass
class EncodedExample:
    """Token ids of one example and which of them belong to the response."""

    input_ids: list[int]
    response_mask: list[int]
    prompt_trimmed: int = 0
    response_trimmed: int = 0


@dataclass
class EncodingReport:
    n_examples: int = 0
    n_prompt_trimmed: int = 0
    n_response_trimmed: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "n_examples": self.n_examples,
            "n_prompt_trimmed": self.n_prompt_trimmed,
            "n_response_trimmed": self.n_response_trimmed,
        }


def _template_ids(tokenizer, messages, add_generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def encode_example(
    tokenizer, messages: Sequence[dict[str, str]], max_length: int | None = None
) -> EncodedExample:
    """Tokenize a chat with the tokenizer's chat template.

    The prompt is rendered with the generation prompt (e.g. ``<|assistant|>``) and the response is
    what the full conversation adds after it, including the template's end-of-turn tokens (the
    tokens the model is trained to produce). Prompt and response are tokenized separately so the
    boundary never merges into one token.
    """
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError(
            "the tokenizer has no chat template; set tokenizer.chat_template (a Jinja string) "
            "or use an instruct model's tokenizer"
        )
    messages = list(messages)
    prompt_text = tokenizer.apply_chat_template(
        messages[:-1], tokenize=False, add_generation_prompt=True
    )
    full_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    if not full_text.startswith(prompt_text):
        raise ValueError(
            "the chat template renders the prompt differently inside the full conversation; "
            "cannot locate the response tokens (use a template whose prompt is a prefix)"
        )
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    response_ids = tokenizer(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
    prompt_trimmed = response_trimmed = 0
    if max_length is not None and len(prompt_ids) + len(response_ids) > max_length:
        if len(response_ids) >= max_length:
            # Keep one prompt token (the generation prompt's last) so the first response token
            # still has a position that predicts it.
            keep = max_length - 1
            response_trimmed = len(response_ids) - keep
            response_ids = response_ids[:keep]
            prompt_trimmed = len(prompt_ids) - 1
            prompt_ids = prompt_ids[-1:]
        else:
            keep = max_length - len(response_ids)
            prompt_trimmed = len(prompt_ids) - keep
            prompt_ids = prompt_ids[-keep:]
    return EncodedExample(
        input_ids=list(prompt_ids) + list(response_ids),
        response_mask=[0] * len(prompt_ids) + [1] * len(response_ids),
        prompt_trimmed=prompt_trimmed,
        response_trimmed=response_trimmed,
    )


def encode_dataset(
    tokenizer, examples: Iterable[ChatExample | Sequence[dict]], max_length: int | None = None
) -> tuple[list[EncodedExample], EncodingReport]:
    """Encode many examples; the report counts how many were trimmed."""
    encoded, report = [], EncodingReport()
    for ex in examples:
        messages = ex.messages if isinstance(ex, ChatExample) else ex
        enc = encode_example(tokenizer, messages, max_length)
        encoded.append(enc)
        report.n_examples += 1
        report.n_prompt_trimmed += enc.prompt_trimmed > 0
        report.n_response_trimmed += enc.response_trimmed > 0
    return encoded, report


def answer_start_window(encoded: Sequence[EncodedExample], k: int) -> list[EncodedExample]:
    """The same examples with ``response_mask`` marking the ``k`` positions where the answer starts.

    Positions ``r0 - 1 .. r0 + k - 2``, ``r0`` the first response token: the last prompt token
    (whose hidden state predicts the answer's first token, before any answer text is seen) and
    the first ``k - 1`` response tokens, clipped at the end of the example. A concept measured
    here reads the model's choice of how to answer rather than its reading of the answer's text.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"the answer-start window must be a whole number of tokens >= 1, got {k!r}")
    out = []
    for i, e in enumerate(encoded):
        if 1 not in e.response_mask:
            raise ValueError(f"example {i} has no response tokens, so it has no answer start")
        r0 = e.response_mask.index(1)
        if r0 == 0:
            raise ValueError(f"example {i} has no prompt token before its response; the answer "
                             "start is the last prompt token (encode with a chat template)")
        mask = [0] * len(e.input_ids)
        for j in range(r0 - 1, min(r0 - 1 + k, len(mask))):
            mask[j] = 1
        out.append(EncodedExample(e.input_ids, mask, e.prompt_trimmed, e.response_trimmed))
    return out


def collate(encoded: Sequence[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: ``input_ids``, ``attention_mask``, ``response_mask``, ``labels``.

    Shapes ``[batch, seq]``. ``labels`` is ``input_ids`` with -100 everywhere but response tokens,
    so a causal-LM loss covers response tokens only.
    """
    if not encoded:
        raise ValueError("cannot collate an empty batch")
    lengths = np.array([len(e.input_ids) for e in encoded])
    width = int(lengths.max())
    ids = np.full((len(encoded), width), pad_token_id, dtype=np.int64)
    resp = np.zeros((len(encoded), width), dtype=np.int64)
    for i, e in enumerate(encoded):  # filled in numpy: one tensor per field, not per example
        ids[i, :lengths[i]] = e.input_ids
        resp[i, :lengths[i]] = e.response_mask
    attn = (np.arange(width)[None, :] < lengths[:, None]).astype(np.int64)
    ids, resp = torch.from_numpy(ids), torch.from_numpy(resp)
    labels = ids.masked_fill(resp == 0, -100)
    return {"input_ids": ids, "attention_mask": torch.from_numpy(attn), "response_mask": resp,
            "labels": labels}


def batches(
    encoded: Sequence[EncodedExample], batch_size: int, pad_token_id: int,
    indices: Sequence[int] | None = None,
) -> Iterator[tuple[list[int], dict[str, torch.Tensor]]]:
    """Yield ``(indices, batch)`` over ``encoded[indices]`` (all by default) in order; batch as
    :func:`collate`, indices into ``encoded``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    order = list(range(len(encoded))) if indices is None else [int(i) for i in indices]
    for start in range(0, len(order), batch_size):
        idx = order[start:start + batch_size]
        yield idx, collate([encoded[i] for i in idx], pad_token_id)
