"""The VALIDATED stamp: the one owner of writing, reading and checking it.

`make validate` writes it into a merged model folder only when every gate passed, with the whole-file sha256 of
every weight file it judged; training the next phase requires it and checks those hashes (the origin project built
phase 1B on a corrupted, never-validated phase 1A; a shard truncated after validation was still trusted).

Every read checks the whole chain (docs/TROUBLESHOOTING.md, "Chain of trust"): the stamp's hashes must be the
manifest's, and the bytes must be those hashes. A missing or malformed link is a refusal, never a downgrade: a
folder shaped like a phase output without a valid manifest is not taken for a plain base (ISSUES_LOG B48).
"""

from __future__ import annotations

import logging
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.core.fsutil import atomic_write_json, read_json_object
from cogumi.core.integrity import verify_weights
from cogumi.core.manifest import MANIFEST, read_manifest

log = logging.getLogger(__name__)

VALIDATED_STAMP = "VALIDATED"
# Files only this project's steps leave in a model folder: a folder holding one is a phase output, whatever it lacks.
OUTPUT_SIGNS = ("merge_report.json", VALIDATED_STAMP, "validation", "adapter_config.json")


MERGE_AGAIN_FIX = ("merge that phase again (`FORCE=1 make merge PHASE=<that phase>`: the old folder is moved aside), "
                   "then `make validate PHASE=<that phase>`")
CHANGED_FIX = ("run `make validate PHASE=<that phase>` again (it re-checks the weights against the merge's "
               "manifest), or `make merge` it again if the files are damaged")


def write_stamp(model_dir: Path, record: dict, *, weights_sha256: dict[str, str]) -> Path:
    """The stamp vouches for exactly these bytes: `weights_sha256` as verify_weights returned them."""
    path = Path(model_dir) / VALIDATED_STAMP
    atomic_write_json(path, {**record, "weights_sha256": weights_sha256})
    return path


def read_stamp(model_dir: Path) -> dict | None:
    """The stamp, None when there is none; one that is not a JSON object is a one-screen error naming it."""
    path = Path(model_dir) / VALIDATED_STAMP
    if not path.exists():
        return None
    return read_json_object(path, fix="run `make validate PHASE=<that phase>` again: it writes a new stamp")


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
    """The stamped folder's weights are the ones validated: the stamp agrees with the merge's manifest, and the bytes
    with both. A one-screen error otherwise."""
    model_dir = Path(model_dir)
    stamp_path = model_dir / VALIDATED_STAMP
    stamp = read_stamp(model_dir) or {}
    recorded = stamp.get("weights_sha256")
    if not _is_hashes(recorded):
        raise UserError(f"the {VALIDATED_STAMP} stamp of {model_dir} holds no whole-file weight hashes, so it "
                        "cannot show the weights are the ones validated", where=str(stamp_path),
                        fix="run `make validate PHASE=<that phase>` again to stamp it with hashes")
    manifest = read_manifest(model_dir)
    if manifest is None or manifest["kind"] != "merged":
        what = f"no {MANIFEST}" if manifest is None else f"a {MANIFEST} of kind {manifest['kind']!r}"
        raise UserError(f"{model_dir} is stamped {VALIDATED_STAMP} but has {what}: nothing shows it is the merge "
                        "that was validated", where=str(model_dir / MANIFEST), fix=MERGE_AGAIN_FIX)
    if manifest.get("weights_sha256") != recorded:
        raise UserError(f"the {VALIDATED_STAMP} stamp of {model_dir} vouches for other weights than its {MANIFEST} "
                        "records (one of them was replaced or edited after validation)", where=str(stamp_path),
                        fix=CHANGED_FIX)
    return verify_weights(model_dir, recorded, against=f"it was validated ({VALIDATED_STAMP} stamp)", fix=CHANGED_FIX)


def _is_hashes(value) -> bool:
    return isinstance(value, dict) and bool(value) and all(isinstance(v, str) for v in value.values())


def output_signs(model_dir: Path) -> list[str]:
    """The files in `model_dir` that only this project's steps write (a merge report, a stamp, an adapter config)."""
    return [name for name in OUTPUT_SIGNS if (Path(model_dir) / name).exists()]


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


def require_validated(model_dir: str | Path, *, allow_unvalidated: bool = False,
                       plain_base: bool = False) -> str | None:
    """A phase's merged output may be a base only once `make validate` stamped it, with its weights unchanged.

    Returns a warning string when a switch admitted the base (the caller records it in the adapter's manifest):
    ALLOW_UNVALIDATED=1 an unstamped merge, PLAIN_BASE=1 a folder shaped like a phase output without a manifest.
    Hub snapshots and plain model folders (no manifest, no file only this project writes) pass.
    """
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        return None
    manifest = read_manifest(model_dir)  # not JSON, or a kind this project never writes: a one-screen error
    if manifest is None:
        signs = output_signs(model_dir)
        if not signs:
            return None
        message = (f"base '{model_dir}' has the files of a phase output ({', '.join(signs)}) but no {MANIFEST}, so "
                   "neither its origin nor its weights can be checked")
        if plain_base:
            return message + " (PLAIN_BASE=1 given: taken as a plain base model)"
        raise UserError(message, where=str(model_dir / MANIFEST),
                        fix=MERGE_AGAIN_FIX + "; or, if it really is a plain model from elsewhere, say so with "
                            "PLAIN_BASE=1 (recorded in the adapter's manifest)")
    if manifest["kind"] != "merged":
        raise UserError(f"base '{model_dir}' is a phase output of kind {manifest['kind']!r} (its {MANIFEST}), not "
                        "a model to train on", where=str(model_dir / MANIFEST),
                        fix="set base_model to the bf16 base or to a validated merged phase output")
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
