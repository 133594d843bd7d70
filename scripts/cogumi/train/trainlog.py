"""train_log.jsonl: the one owner of the training log (append, read, cut back to a resumed step).

A row is appended whole or not at all: on a full disk the partial bytes are cut off again and the run stops with
DiskStop (exit 3, resumable). A torn last line (a kill or an older version mid-append) is dropped on resume with a
warning, so a full disk never leaves a run that cannot start again (ISSUES_LOG B20).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.core.fsutil import atomic_write_text

log = logging.getLogger(__name__)

TRAIN_LOG = "train_log.jsonl"


def append_row(path: Path, row: dict) -> None:
    """Append one JSON line with a single write; on failure truncate back to the previous end."""
    from cogumi.train.checkpoints import DiskStop

    data = (json.dumps(row) + "\n").encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = os.write(fd, data)
            if written != len(data):
                raise OSError(28, f"short write ({written} of {len(data)} bytes)")
        except OSError as err:
            os.ftruncate(fd, start)  # shrinking a file never needs free space
            raise DiskStop(f"could not append to {path.name} at step {row.get('step')}: {err.strerror or err}; "
                           "the log is intact up to the previous row",
                           where=str(path),
                           fix="free space on that filesystem, then run `make train` again: it resumes from the "
                               "newest complete checkpoint") from err
    finally:
        os.close(fd)


def _parse(path: Path) -> tuple[list[tuple[str, dict]], bool]:
    """([(line, row)], torn): rows in order; `torn` when the last line is cut off or not JSON."""
    text = path.read_text(encoding="utf-8", errors="replace")
    lines = text.split("\n")
    rows, torn = [], False
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        last = lineno == len(lines)  # no newline after it: an append that did not finish
        try:
            row = json.loads(line)
        except json.JSONDecodeError as err:
            if last or all(not rest.strip() for rest in lines[lineno:]):
                torn = True
                break
            raise UserError(f"line {lineno} of the training log is not JSON ({err.msg})", where=f"{path}:{lineno}",
                            fix="delete that line (the log is only a record; checkpoints hold the state), then "
                                "run again") from None
        if last:
            torn = True
            break
        rows.append((line, row))
    return rows, torn


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from (and a torn last line), so each step appears once."""
    if not path.is_file():  # nothing logged yet (anything else in its place fails at the first append, loudly)
        return
    rows, torn = _parse(path)
    if torn:
        log.warning("%s: dropped a torn last line (an append that did not finish)", path.name)
    kept = [line for line, row in rows if row.get("step", 0) <= step]
    try:
        atomic_write_text(path, "".join(line + "\n" for line in kept))
    except OSError as err:  # the old log stays as it was: the rewrite goes to a temp name first
        from cogumi.train.checkpoints import DiskStop

        raise DiskStop(f"could not rewrite {path.name} for the resume: {err.strerror or err}", where=str(path),
                       fix="free space on that filesystem, then run `make train` again") from err


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [row for _line, row in _parse(path)[0]]
