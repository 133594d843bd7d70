"""manifest.json: what an artifact was made from, so later steps can refuse a mismatch.

Every artifact folder (adapter, merged model, quantized model) carries one. Fields:
kind, created, git_commit, lock_hash, config_hash, base_model, base_fingerprint, adapter_hash, dtype, plus extras.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.core.fsutil import atomic_write_json, read_json_object
from cogumi.core.paths import REPO_ROOT
from cogumi.core.safetensors_io import weight_files

LOCK_FILE = REPO_ROOT / "requirements" / "base.txt"
MANIFEST = "manifest.json"
KINDS = ("adapter", "merged", "quantized")  # every kind write_manifest is called with
REMAKE = ("the step that made this folder writes it: make the folder again (`FORCE=1 make merge PHASE=<p>` for a "
          "merged model, `make train PHASE=<p>` for an adapter) or restore the file")
SAMPLE_EVERY = 64 * 1024 * 1024
SAMPLE_BYTES = 64 * 1024


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sha256_json(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def weights_fingerprint(model_dir: Path) -> str | None:
    """A fast identity of a model's weights: every shard's name, size, header and sampled data blocks.

    Hashing all 16 GB of an 8B model would take minutes at every step; headers plus a 64 KiB sample
    every 64 MiB tell two different checkpoints apart (fine-tuning changes every sampled block).
    """
    files = weight_files(Path(model_dir))
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with open(path, "rb") as fh:
            for offset in range(0, size, SAMPLE_EVERY):
                fh.seek(offset)
                digest.update(fh.read(SAMPLE_BYTES))
            fh.seek(max(0, size - SAMPLE_BYTES))
            digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def lock_hash() -> str | None:
    return sha256_file(LOCK_FILE) if LOCK_FILE.exists() else None


def write_manifest(folder: Path, kind: str, **fields) -> dict:
    manifest = {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "git_commit": git_commit(),
        "lock_hash": lock_hash(),
        **fields,
    }
    atomic_write_json(Path(folder) / MANIFEST, manifest)
    return manifest


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, None when it has none. One that is not a JSON object with a kind this project writes
    is a one-screen error naming the file: a malformed manifest is never read as "no manifest" (ISSUES_LOG B47)."""
    path = Path(folder) / MANIFEST
    if not path.exists():
        return None
    manifest = read_json_object(path, fix=REMAKE)
    if manifest.get("kind") not in KINDS:
        raise UserError(f"{MANIFEST} says kind {manifest.get('kind')!r}, which is none of the kinds this project "
                        f"writes ({', '.join(KINDS)}): it was edited or comes from elsewhere", where=str(path),
                        fix=REMAKE)
    return manifest
