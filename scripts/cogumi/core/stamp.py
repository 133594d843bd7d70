"""The VALIDATED stamp: the one owner of writing, reading and checking it.

`make validate` writes it into a merged model folder only when every gate passed, with the whole-file sha256 of
every weight file it judged; training the next phase requires it and checks those hashes (the origin project built
phase 1B on a corrupted, never-validated phase 1A; a shard truncated after validation was still trusted).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.core.fsutil import atomic_write_json
from cogumi.core.integrity import verify_weights

log = logging.getLogger(__name__)

VALIDATED_STAMP = "VALIDATED"


CHANGED_FIX = ("run `make validate PHASE=<that phase>` again (it re-checks the weights against the merge's "
               "manifest), or `make merge` it again if the files are damaged")


def write_stamp(model_dir: Path, record: dict, *, weights_sha256: dict[str, str]) -> Path:
    """The stamp vouches for exactly these bytes: `weights_sha256` as verify_weights returned them."""
    path = Path(model_dir) / VALIDATED_STAMP
    atomic_write_json(path, {**record, "weights_sha256": weights_sha256})
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


def verify_stamped_weights(model_dir: Path) -> dict[str, str]:
    """The stamped folder's weights are the ones validated; a one-screen "changed since" error otherwise."""
    stamp = read_stamp(model_dir) or {}
    recorded = stamp.get("weights_sha256")
    if not recorded:
        raise UserError(f"the {VALIDATED_STAMP} stamp of {model_dir} predates whole-file weight hashes, so it "
                        "cannot show the weights are the ones validated", where=str(Path(model_dir) / VALIDATED_STAMP),
                        fix="run `make validate PHASE=<that phase>` again to stamp it with hashes")
    return verify_weights(model_dir, recorded, against=f"it was validated ({VALIDATED_STAMP} stamp)", fix=CHANGED_FIX)


def stamp_is_current(model_dir: Path) -> bool:
    """True when the folder is stamped and its weights are still the stamped ones (the demo's reuse check)."""
    if not is_stamped(model_dir):
        return False
    try:
        verify_stamped_weights(model_dir)
    except UserError as err:
        log.info("%s", err.what)
        return False
    return True


def require_validated(model_dir: str | Path, *, allow_unvalidated: bool = False) -> str | None:
    """A phase's merged output may be a base only once `make validate` stamped it, with its weights unchanged.

    Returns a warning string when ALLOW_UNVALIDATED=1 admitted an unstamped base (the caller records it in the
    manifest). Hub ids and plain model folders without a Cogumi manifest are not phase outputs and pass.
    """
    model_dir = Path(model_dir)
    manifest = model_dir / "manifest.json"
    if not (model_dir.is_dir() and manifest.exists()):
        return None
    if json.loads(manifest.read_text(encoding="utf-8")).get("kind") != "merged":
        return None
    if is_stamped(model_dir):
        verify_stamped_weights(model_dir)  # ALLOW_UNVALIDATED admits no stamp, never a stamp that lies
        return None
    message = f"base '{model_dir}' is a merged phase output without its {VALIDATED_STAMP} stamp"
    if allow_unvalidated:
        return message + " (ALLOW_UNVALIDATED=1 given: continuing)"
    raise UserError(
        message + ": it has not passed `make validate`, and training on an unvalidated merge is how the origin "
        "project built phase 1B on a corrupted phase 1A.",
        where=str(model_dir),
        fix="run `make validate PHASE=<previous phase>` first, or pass ALLOW_UNVALIDATED=1 to train on it anyway "
            "(recorded in the adapter's manifest)",
    )
