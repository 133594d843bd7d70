"""train_log.jsonl: the one owner of the training log (append, read, cut back to a resumed step)."""

from __future__ import annotations

import json
from pathlib import Path

from cogumi.core.fsutil import atomic_write_text

TRAIN_LOG = "train_log.jsonl"


def append_row(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(row) + "\n")


def truncate_log(path: Path, step: int) -> None:
    """Drop log rows written after the checkpoint we resume from, so each step appears once."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines()
            if line.strip() and json.loads(line)["step"] <= step]
    atomic_write_text(path, "".join(row + "\n" for row in rows))


def read_log(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
