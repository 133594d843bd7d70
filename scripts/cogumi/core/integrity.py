"""Whole-file content hashes of a model's weights, and their check: the reader side of the integrity chain.

The merge records `weights_sha256: {file name: sha256 of the whole file}` (every safetensors shard and the index
json) in the merged model's manifest.json; `make validate` checks the files against it before judging and copies
the hashes into the VALIDATED stamp; the next phase's training and the demo's reuse check verify them against the
stamp. A sampled fingerprint missed a 64 KiB overwrite between its samples, and a truncated shard was stamped
VALIDATED (ISSUES_LOG B22): every byte is hashed here.
"""

from __future__ import annotations

import hashlib
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from cogumi.core.errors import UserError
from cogumi.core.safetensors_io import read_header, tensor_entries, weight_files

log = logging.getLogger(__name__)

INDEX = "model.safetensors.index.json"
BLOCK = 8 << 20


def hashed_files(model_dir: Path) -> list[Path]:
    """The files the hashes cover: every weight file, plus the shard index when there is one."""
    model_dir = Path(model_dir)
    files = list(weight_files(model_dir))
    if (model_dir / INDEX).exists():
        files.append(model_dir / INDEX)
    return files


def sha256_whole(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(BLOCK):
            digest.update(block)  # hashlib drops the GIL for large blocks: shards hash in parallel threads
    return digest.hexdigest()


def weights_sha256(model_dir: Path) -> dict[str, str]:
    """{file name: sha256 hex} for every hashed file of `model_dir` (threads: one 8B model is ~16 GB)."""
    files = hashed_files(model_dir)
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=min(8, max(1, len(files)))) as pool:
        digests = list(pool.map(sha256_whole, files))
    total = sum(p.stat().st_size for p in files)
    log.info("hashed %d weight files (%.2f GB) of %s in %.1f s", len(files), total / 1e9, model_dir,
             time.perf_counter() - start)
    return {p.name: d for p, d in zip(files, digests, strict=True)}


def structure_problems(model_dir: Path) -> list[str]:
    """Shards that are cut short or too long for their own header (found without hashing anything)."""
    problems = []
    for path in weight_files(model_dir):
        if not path.exists():
            problems.append(f"{path.name} is missing")
            continue
        try:
            header = read_header(path)
        except UserError as err:
            problems.append(f"{path.name}: {err.what}")
            continue
        with open(path, "rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
        ends = [entry["data_offsets"][1] for entry in tensor_entries(header).values()]
        expected = 8 + header_len + max(ends, default=0)
        size = path.stat().st_size
        if size != expected:
            problems.append(f"{path.name} is {size} bytes, its header describes {expected}")
    return problems


def compare(recorded: dict[str, str], actual: dict[str, str]) -> list[str]:
    """Human lines for every file that is missing, extra or different."""
    lines = []
    for name in sorted(set(recorded) | set(actual)):
        if name not in actual:
            lines.append(f"{name} is missing")
        elif name not in recorded:
            lines.append(f"{name} was not there when the hashes were recorded")
        elif recorded[name] != actual[name]:
            lines.append(f"{name} changed (sha256 {actual[name][:12]}..., recorded {recorded[name][:12]}...)")
    return lines


def verify_weights(model_dir: Path, recorded: dict[str, str] | None, *, against: str, fix: str) -> dict[str, str]:
    """Check a model folder's weight files; returns their hashes. Any difference is a one-screen UserError.

    `recorded` None: only the structure is checked (a model merged before whole-file hashes existed).
    `against` names what recorded the hashes, e.g. "its manifest.json" or "its VALIDATED stamp".
    """
    model_dir = Path(model_dir)
    problems = structure_problems(model_dir)
    actual = weights_sha256(model_dir) if not problems else {}
    if not problems and recorded is not None:
        problems = compare(recorded, actual)
    if problems:
        shown = "; ".join(problems[:3]) + (f"; and {len(problems) - 3} more" if len(problems) > 3 else "")
        raise UserError(f"the weights of {model_dir} changed since {against} was written: {shown}",
                        where=str(model_dir), fix=fix)
    return actual
