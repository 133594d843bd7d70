"""Atomic writes and never-delete moves: nothing a user already has is lost."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: Path):
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def read_json_object(path: Path, *, fix: str) -> dict:
    """A JSON file that must hold one object (a manifest, a stamp, an adapter config): anything else is a one-screen
    UserError naming the file (and line), never a traceback."""
    from cogumi.core.errors import UserError

    path = Path(path)
    try:
        data = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path.name} is not UTF-8 text", where=str(path), fix=fix) from None
    except json.JSONDecodeError as err:
        raise UserError(f"{path.name} is not valid JSON ({err.msg}, line {err.lineno} column {err.colno})",
                        where=f"{path}:{err.lineno}", fix=fix) from None
    if not isinstance(data, dict):
        raise UserError(f"{path.name} holds a JSON {type(data).__name__}, not an object", where=str(path), fix=fix)
    return data


def aside_name(path: Path, label: str = "old") -> Path:
    """A free sibling name like `run.old-20261125-171500` for moving `path` out of the way."""
    path = Path(path)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    candidate = path.with_name(f"{path.name}.{label}-{stamp}")
    n = 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{label}-{stamp}-{n}")
        n += 1
    return candidate


def move_aside(path: Path, label: str = "old") -> Path:
    """Rename `path` to a fresh sibling name instead of deleting it; returns the new path."""
    target = aside_name(path, label)
    os.replace(path, target)
    return target


def dir_size(path: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    return total


def free_bytes(path: Path) -> int:
    """Free space on the filesystem that holds `path` (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists():
        path = path.parent
    return shutil.disk_usage(path).free


def iter_jsonl(path: Path, *, fix: str):
    """Yield (`file:line`, row) for each non-blank line of a JSONL file (gzip when it ends in .gz).

    A line that is not JSON is a UserError naming the file and line, with `fix` saying what a row should be.
    """
    import gzip

    from cogumi.core.errors import UserError

    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                bad = raw[err.start:err.start + 1]
                raise UserError(f"line {lineno} is not UTF-8 text (byte {err.start + 1} is {bad!r})", where=where,
                                fix="save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8`)") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"line {lineno} is not valid JSON ({err.msg}, column {err.colno})", where=where,
                                fix=fix) from None
            yield where, row
