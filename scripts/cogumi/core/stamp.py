"""The VALIDATED stamp: the one owner of writing, reading and checking it.

`make validate` writes it into a merged model folder only when every gate passed; training the next phase
requires it (the origin project built phase 1B on a corrupted, never-validated phase 1A).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.core.fsutil import atomic_write_json

log = logging.getLogger(__name__)

VALIDATED_STAMP = "VALIDATED"


def write_stamp(model_dir: Path, record: dict) -> Path:
    path = Path(model_dir) / VALIDATED_STAMP
    atomic_write_json(path, record)
    return path


def read_stamp(model_dir: Path) -> dict | None:
    path = Path(model_dir) / VALIDATED_STAMP
    return json.loads(path.read_text(encoding="utf-8")) if path.exists() else None


def is_stamped(model_dir: Path) -> bool:
    return (Path(model_dir) / VALIDATED_STAMP).exists()


def remove_stamp(model_dir: Path) -> bool:
    """Remove an earlier stamp (a new validation no longer vouches for it); True when there was one."""
    path = Path(model_dir) / VALIDATED_STAMP
    if not path.exists():
        return False
    path.unlink()
    log.info("removed the earlier %s stamp; it comes back only if every gate passes", VALIDATED_STAMP)
    return True


def require_validated(model_dir: str | Path, *, force: bool = False) -> str | None:
    """A phase's merged output may be a base only once `make validate` stamped it.

    Returns a warning string when FORCE=1 overrode a missing stamp (the caller records it in the manifest).
    Hub ids and plain model folders without a Cogumi manifest are not phase outputs and pass.
    """
    model_dir = Path(model_dir)
    manifest = model_dir / "manifest.json"
    if not (model_dir.is_dir() and manifest.exists()):
        return None
    if json.loads(manifest.read_text(encoding="utf-8")).get("kind") != "merged":
        return None
    if is_stamped(model_dir):
        return None
    message = f"base '{model_dir}' is a merged phase output without its {VALIDATED_STAMP} stamp"
    if force:
        return message + " (FORCE=1 given: continuing)"
    raise UserError(
        message + ": it has not passed `make validate`, and training on an unvalidated merge is how the origin "
        "project built phase 1B on a corrupted phase 1A.",
        where=str(model_dir),
        fix="run `make validate PHASE=<previous phase>` first, or pass FORCE=1 to override (recorded in the manifest)",
    )
