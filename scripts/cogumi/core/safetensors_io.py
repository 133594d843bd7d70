"""Reading safetensors headers without loading any weights."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from cogumi.core.errors import UserError

# A safetensors file is: 8-byte little-endian header length, a JSON header, then raw tensor bytes.
MAX_HEADER_BYTES = 100 * 1024 * 1024


def read_header(path: Path) -> dict:
    """Return the JSON header of one safetensors file (tensor name -> dtype/shape/offsets)."""
    path = Path(path)
    try:
        with open(path, "rb") as fh:
            raw_len = fh.read(8)
            if len(raw_len) != 8:
                raise UserError(f"{path.name} is not a safetensors file (too short)", where=str(path),
                                fix="re-download or re-create this file")
            (length,) = struct.unpack("<Q", raw_len)
            if length > MAX_HEADER_BYTES:
                raise UserError(f"{path.name} has an implausible header ({length} bytes)", where=str(path),
                                fix="the file is corrupt: re-download or re-create it")
            header = json.loads(fh.read(length))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read safetensors header of {path.name}: {err}", where=str(path),
                        fix="the file is corrupt or truncated: re-download or re-create it") from err
    return header


def tensor_entries(header: dict) -> dict:
    """The header without its `__metadata__` entry."""
    return {k: v for k, v in header.items() if k != "__metadata__"}


def weight_files(model_dir: Path) -> list[Path]:
    """The safetensors files of a model folder, in index order when sharded."""
    model_dir = Path(model_dir)
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        with open(index, encoding="utf-8") as fh:
            weight_map = json.load(fh)["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    return [single] if single.exists() else sorted(model_dir.glob("*.safetensors"))
