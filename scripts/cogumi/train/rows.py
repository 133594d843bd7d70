"""Training rows: read from the files people have, checked, and turned into one shape, a list of chat messages.

Files: .jsonl (or .jsonl.gz, and a .json holding JSON lines) read line by line; a .json array, .parquet and .csv
through `datasets`' local loaders (offline); any other name is tried as a datasets hub id while online. Every row
carries where it came from (`file:line`, or `file row N`), so a malformed one names its place.

Shapes (data.format; auto picks one per row by its keys, ignoring empty columns, and names the keys when none fits):
  messages         {"messages": [{"role": "system"|"user"|"assistant", "content": "..."}, ...]}
  prompt_response  {"prompt": "...", "response": "...", "system": optional}
  sharegpt         {"conversations": [{"from": "system"|"human"|"gpt", "value": "..."}, ...], "system": optional}
  alpaca           {"instruction": "...", "input": optional, "output": "...", "system": optional}
Other column names map onto these keys with data.columns ({prompt: question, response: answer}); other speaker
names onto system/user/assistant with data.roles ({bot: assistant}).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cogumi.core.confcheck import ROLES as CHAT_ROLES
from cogumi.core.config import resolve_path
from cogumi.core.errors import UserError
from cogumi.core.fsutil import iter_jsonl
from cogumi.core.hub import is_offline, local_folder

log = logging.getLogger(__name__)

ROLES = set(CHAT_ROLES)
ROW_FORMAT = ('each row must be {"messages": [{"role": "user", "content": "..."}, {"role": "assistant", '
              '"content": "..."}]}, {"prompt": "...", "response": "..."}, ShareGPT {"conversations": [{"from": '
              '"human", "value": "..."}, {"from": "gpt", "value": "..."}]} or Alpaca {"instruction": "...", '
              '"input": "...", "output": "..."}')
# ShareGPT speaker names, as the common exports write them.
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
# datasets' loader for each local file kind that is not JSON lines.
LOADERS = {".parquet": "parquet", ".csv": "csv", ".json": "json"}


# ---------------------------------------------------------------- reading


def read_rows(source: str, split: str = "train", *, key: str = "data.train_path") -> tuple[list[tuple[str, dict]], str]:
    """(where, row) pairs from a local file, or from a datasets hub id when the path does not exist."""
    path = resolve_path(source)
    if path.exists():
        rows = _read_local(path)
        if not rows:
            raise UserError(f"{path} has no rows", where=str(path), fix=ROW_FORMAT)
        return rows, str(path)
    looks_local = local_folder(source) is not None or source.endswith((".jsonl", ".gz", *LOADERS))
    if is_offline() or looks_local:
        what = "held-out data" if key == "data.eval_path" else "training data"
        raise UserError(f"{what} not found: {path}", where=key,
                        fix="create the file (.jsonl, .json, .parquet or .csv; " + ROW_FORMAT + "), or name a "
                            "datasets hub id (owner/name) while online")
    return _read_hub_dataset(source, split, key), source


def _read_local(path: Path) -> list[tuple[str, dict]]:
    kind = LOADERS.get(path.suffix.lower())
    if kind is None or (kind == "json" and not _is_json_array(path)):
        return list(iter_jsonl(path, fix=ROW_FORMAT))  # exact line numbers
    import datasets

    # A private cache, gone afterwards: the rows are copied into memory before it goes.
    with tempfile.TemporaryDirectory(prefix="cogumi-data-") as cache:
        try:
            table = datasets.load_dataset(kind, data_files=str(path), split="train", cache_dir=cache)
        except Exception as err:  # noqa: BLE001 - pyarrow and datasets raise many types; all mean "cannot read it"
            raise UserError(f"could not read {path} as {kind}: {type(err).__name__}: {str(err)[:300]}",
                            where=str(path), fix=f"check that the file is valid {kind} ({ROW_FORMAT})") from err
        rows = table.to_list()
    # csv: line 1 is the header (a quoted value spanning lines shifts later numbers; the row number does not)
    if kind == "csv":
        return [(f"{path}:{i + 2} (row {i + 1})", row) for i, row in enumerate(rows)]
    return [(f"{path} row {i + 1}", row) for i, row in enumerate(rows)]


def _is_json_array(path: Path) -> bool:
    with open(path, "rb") as fh:
        head = fh.read(4096).lstrip(b"\xef\xbb\xbf \t\r\n")
    return head.startswith(b"[")


def _read_hub_dataset(source: str, split: str, key: str) -> list[tuple[str, dict]]:
    import datasets

    log.info("data: %s is not a local file; loading it from the hub (split %s)", source, split)
    try:
        rows = datasets.load_dataset(source, split=split)
    except Exception as err:  # noqa: BLE001 - datasets raises many types; all mean "could not load this id"
        raise UserError(f"could not load the dataset '{source}' (split {split}): {type(err).__name__}: "
                        f"{str(err)[:300]}", where=key,
                        fix="check the id and split (data.hub_split), your network and HF_TOKEN, "
                            "or point it at a local file") from err
    return [(f"{source}[{split}] row {i}", dict(row)) for i, row in enumerate(rows)]


# ---------------------------------------------------------------- shapes


@dataclass(frozen=True)
class Shape:
    """How to read a row: data.format, data.columns (shape key -> the file's column), data.roles (name -> role)."""

    format: str = "auto"
    columns: dict = field(default_factory=dict)
    roles: dict = field(default_factory=dict)

    @classmethod
    def of(cls, cfg) -> Shape:
        return cls(cfg.format, dict(cfg.columns), dict(cfg.roles))

    def rename(self, row):
        """The row with each mapped column also under its shape key (a missing column stays missing)."""
        if not (self.columns and isinstance(row, dict)):
            return row
        return {**row, **{key: row[column] for key, column in self.columns.items() if column in row}}


def row_format(row, where: str, fmt: str = "auto") -> str:
    """The shape of one row: `fmt` itself, or with auto the one its (non-empty) keys name."""
    if fmt != "auto":
        return fmt
    keys = {k for k, v in row.items() if v is not None} if isinstance(row, dict) else set()
    if "messages" in keys:
        return "messages"
    if "conversations" in keys:
        return "sharegpt"
    if {"prompt", "response"} <= keys:
        return "prompt_response"
    if {"instruction", "output"} <= keys:
        return "alpaca"
    seen = sorted(keys) if isinstance(row, dict) else type(row).__name__
    raise UserError(f"malformed row: data.format auto cannot tell its shape from its keys {seen}", where=where,
                    fix=ROW_FORMAT + "; or set data.format")


def to_messages(row, where: str, shape: Shape | str = "auto") -> list[dict]:
    """A validated list of chat messages for one row; a malformed row names its file and line."""
    shape = shape if isinstance(shape, Shape) else Shape(shape)
    row = shape.rename(row)
    kind = row_format(row, where, shape.format)
    if not isinstance(row, dict):
        raise UserError(f"malformed row: a {type(row).__name__}, not an object", where=where, fix=ROW_FORMAT)
    return _refuse_empty_answers(_SHAPES[kind](row, where, shape.roles), where)


def _messages(row: dict, where: str, roles: dict) -> list[dict]:
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise UserError("'messages' must be a non-empty list", where=where, fix=ROW_FORMAT)
    out = []
    for i, msg in enumerate(messages):
        role = roles.get(msg.get("role"), msg.get("role")) if isinstance(msg, dict) else None
        if not (role in ROLES and isinstance(msg.get("content"), str)):
            raise UserError(f"message {i} needs a role in {sorted(ROLES)} and a string content, got "
                            + _describe_message(msg), where=where,
                            fix=ROW_FORMAT + "; data.roles maps other names, e.g. {bot: assistant}")
        out.append({"role": role, "content": msg["content"]})
    return _need_answer(out, where)


def _prompt_response(row: dict, where: str, roles: dict) -> list[dict]:
    if not (isinstance(row.get("prompt"), str) and isinstance(row.get("response"), str)):
        raise UserError(f"malformed row: prompt_response needs string 'prompt' and 'response' (keys: {sorted(row)})",
                        where=where, fix=ROW_FORMAT)
    return _system(row) + [{"role": "user", "content": row["prompt"]},
                           {"role": "assistant", "content": row["response"]}]


def _sharegpt(row: dict, where: str, roles: dict) -> list[dict]:
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise UserError("'conversations' must be a non-empty list", where=where, fix=ROW_FORMAT)
    speakers = {**SHAREGPT_ROLES, **roles}
    messages = []
    for i, turn in enumerate(turns):
        speaker = turn.get("from") if isinstance(turn, dict) else None
        if speaker not in speakers or not isinstance(turn.get("value"), str):
            got = (f"from {speaker!r} and value of type {type(turn.get('value')).__name__}" if isinstance(turn, dict)
                   else f"a {type(turn).__name__}")
            raise UserError(f"turn {i} needs 'from' in {sorted(speakers)} and a string 'value', got {got}",
                            where=where, fix=ROW_FORMAT + "; data.roles maps other names, e.g. {bot: assistant}")
        messages.append({"role": speakers[speaker], "content": turn["value"]})
    if messages[0]["role"] != "system":
        messages = _system(row) + messages
    return _need_answer(messages, where)


def _alpaca(row: dict, where: str, roles: dict) -> list[dict]:
    if not (isinstance(row.get("instruction"), str) and isinstance(row.get("output"), str)):
        raise UserError(f"malformed row: alpaca needs string 'instruction' and 'output' (keys: {sorted(row)})",
                        where=where, fix=ROW_FORMAT)
    extra = row.get("input")
    prompt = row["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
    return _system(row) + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


_SHAPES = {"messages": _messages, "prompt_response": _prompt_response, "sharegpt": _sharegpt, "alpaca": _alpaca}


def _system(row: dict) -> list[dict]:
    return [{"role": "system", "content": row["system"]}] if isinstance(row.get("system"), str) else []


def _need_answer(messages: list[dict], where: str) -> list[dict]:
    if not any(m["role"] == "assistant" for m in messages):
        raise UserError("the row has no assistant message, so nothing to learn", where=where, fix=ROW_FORMAT)
    return messages


def _describe_message(msg) -> str:
    """The role and the content's type first: a long content must not hide the role being complained about."""
    if not isinstance(msg, dict):
        return f"a {type(msg).__name__}"
    return f"role {msg.get('role')!r} and content of type {type(msg.get('content')).__name__}"


def _refuse_empty_answers(messages: list[dict], where: str) -> list[dict]:
    """An empty assistant content trains on the end-of-turn token alone: it teaches the model to say nothing."""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant" and not msg["content"].strip():
            raise UserError(f"message {i} (assistant) has empty content: this row would teach the model to answer "
                            "with nothing", where=where, fix="remove the row or give it its answer")
    return messages
