"""The merge's inputs, read and checked before a byte is written: the base folder and its shards, the adapter
(its files, its recorded hash, its lineage) and the side files carried into the merged folder."""

from __future__ import annotations

import shutil
import struct
from dataclasses import dataclass, field
from pathlib import Path

from cogumi.core import fsutil, hub
from cogumi.core.config import resolve_path
from cogumi.core.errors import UserError
from cogumi.core.guards import FIX_QUANTIZED, WHY_QUANTIZED, quantization_reasons, refuse_quantized_base
from cogumi.core.manifest import MANIFEST, read_manifest, sha256_file, weights_fingerprint
from cogumi.core.safetensors_io import read_header, tensor_entries, weight_files
from cogumi.core.stamp import VALIDATED_STAMP

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INDEX = "model.safetensors.index.json"
REPORT = "merge_report.json"
# Top-level files of a base folder that are not carried into the merged folder (weights are rewritten;
# a previous phase's manifest, report and validation stamp describe that phase, not this merge).
NOT_COPIED = {INDEX, MANIFEST, REPORT, VALIDATED_STAMP}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict
    manifest: dict
    weights: Path
    sha256: str  # of the weights file, once check_adapter_hash has checked it against the manifest


@dataclass(frozen=True)
class Shard:
    path: Path
    data_start: int  # 8 + header length: where tensor bytes begin
    entries: dict = field(repr=False)  # name -> {dtype, shape, data_offsets}, in file order


# ---------------------------------------------------------------- inputs and refusals


def resolve_base(spec: str) -> Path:
    """The base as a local folder: a path, or a hub id resolved through the hub cache the trainer filled.

    The full quantization check (config, headers) runs on the folder in refuse_quantized; a hub id's name is
    checked here, before anything is fetched."""
    folder = hub.local_folder(spec)
    if folder is None:
        refuse_quantized_base(spec)
        return hub.download(spec)
    if not folder.is_dir():
        raise UserError(f"base model folder not found: {folder}", where="base_model",
                        fix="set base_model to the local folder of the model the adapter was trained on")
    return folder


def load_adapter(adapter_dir: Path) -> Adapter:
    adapter_dir = Path(adapter_dir)
    fix = "train the phase first (`make train PHASE=<p>`); the trainer writes all three files at the end"
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS, MANIFEST):
        if not (adapter_dir / name).is_file():
            legacy = " (only a pickled adapter_model.bin: re-save it with safe_serialization=True)" if (
                name == ADAPTER_WEIGHTS and (adapter_dir / "adapter_model.bin").exists()) else ""
            raise UserError(f"the adapter folder has no {name}{legacy}", where=str(adapter_dir / name), fix=fix)
    manifest = read_manifest(adapter_dir)  # not JSON, or a kind this project never writes: a one-screen error
    if manifest["kind"] != "adapter":
        raise UserError(f"the adapter folder's {MANIFEST} says kind {manifest['kind']!r}, not 'adapter'",
                        where=str(adapter_dir / MANIFEST), fix=fix)
    return Adapter(path=adapter_dir, config=fsutil.read_json_object(adapter_dir / ADAPTER_CONFIG, fix=fix),
                   manifest=manifest, weights=adapter_dir / ADAPTER_WEIGHTS, sha256="")


def check_adapter_hash(adapter: Adapter) -> Adapter:
    """The adapter's bytes must be the ones training recorded: flipped bytes of the same size would otherwise be
    merged and then "verified" against the same corrupted file."""
    recorded = adapter.manifest.get("adapter_hash")
    actual = sha256_file(adapter.weights)
    where = str(adapter.weights)
    if not recorded:
        raise UserError(f"the adapter's {MANIFEST} records no adapter_hash, so its weights cannot be checked",
                        where=str(adapter.path / MANIFEST),
                        fix="export the adapter again with `make train` (it resumes from the last checkpoint)")
    if recorded != actual:
        raise UserError(f"{ADAPTER_WEIGHTS} changed since training: its sha256 is {actual[:16]}..., the manifest "
                        f"records {recorded[:16]}...", where=where,
                        fix="the file is corrupt or was replaced: restore it, or export it again from the last "
                            "checkpoint with `make train`")
    return Adapter(adapter.path, adapter.config, adapter.manifest, adapter.weights, sha256=actual)


def refuse_quantized(adapter: Adapter, base_dir: Path) -> None:
    """The 4-bit incident: an adapter trained on a quantized base corrupts real weights when merged."""
    refuse_quantized_base(base_dir)
    named = adapter.config.get("base_model_name_or_path") or ""
    reasons = quantization_reasons(named) if named else []
    if adapter.manifest.get("trained_on_quantized"):
        reasons.append("its manifest.json says trained_on_quantized")
    if reasons:
        raise UserError(f"the adapter was trained on a quantized base ({'; '.join(reasons)}). {WHY_QUANTIZED}",
                        where=str(adapter.path), fix="retrain the adapter on the bf16 base; " + FIX_QUANTIZED)


def check_supported(adapter: Adapter) -> None:
    cfg, where = adapter.config, str(adapter.path / ADAPTER_CONFIG)
    if cfg.get("peft_type") != "LORA":
        raise UserError(f"adapter peft_type is {cfg.get('peft_type')!r}, only LORA can be merged here", where=where,
                        fix="merge this adapter type with peft's merge_and_unload")
    if cfg.get("use_dora"):
        raise UserError("DoRA adapters are not supported by the streaming merge", where=where,
                        fix="train with use_dora off (the phase configs never set it)")


def check_lineage(adapter: Adapter, base_model: str, base_dir: Path) -> str:
    """The adapter must come from this base: by name (adapter_config) and by weights (manifest fingerprint)."""
    named = adapter.config.get("base_model_name_or_path")
    if named and not _same_model(named, base_model, base_dir):
        raise UserError(f"lineage mismatch: the adapter was trained on '{named}' but the base given is "
                        f"'{base_model}' ({base_dir})", where=str(adapter.path / ADAPTER_CONFIG),
                        fix="set base_model in the phase config to the adapter's base, or merge the adapter "
                            "trained on this base")
    recorded = adapter.manifest.get("base_fingerprint")
    actual = weights_fingerprint(base_dir)
    if not recorded or recorded != actual:
        raise UserError(f"lineage mismatch: the adapter's manifest records base weights {str(recorded)[:16]} but "
                        f"'{base_model}' ({base_dir}) has weights {str(actual)[:16]}",
                        where=str(adapter.path / MANIFEST),
                        fix="the base changed since training (or is another model): merge into the exact base "
                            "the adapter was trained on, or retrain")
    return actual


def _same_model(named: str, base_model: str, base_dir: Path) -> bool:
    if named == base_model:
        return True
    path = Path(named).expanduser()
    local = path if path.is_absolute() else resolve_path(named)
    return local.exists() and local.resolve() == Path(base_dir).resolve()


def scan_base(base_dir: Path) -> list[Shard]:
    """Every base shard's header, checked complete (a truncated shard fails here, before anything is written)."""
    files = weight_files(base_dir)
    if not files:
        raise UserError("the base folder has no safetensors weights", where=str(base_dir),
                        fix="merge into a safetensors model folder (save_pretrained(safe_serialization=True))")
    return [_scan_shard(path) for path in files]


def _scan_shard(path: Path) -> Shard:
    if not path.is_file():
        raise UserError(f"shard {path.name} is listed in the index but missing", where=str(path),
                        fix="re-download or re-create the base model")
    header = read_header(path)
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
    entries = dict(sorted(tensor_entries(header).items(), key=lambda kv: kv[1]["data_offsets"][0]))
    end = 0
    for name, info in entries.items():
        start, stop = info["data_offsets"]
        if start != end:
            raise UserError(f"{path.name}: tensor '{name}' does not start where the previous one ends",
                            where=str(path), fix="the file is corrupt: re-download or re-create it")
        end = stop
    size = path.stat().st_size
    if size != 8 + length + end:
        raise UserError(f"{path.name} is truncated or padded: {size} bytes on disk, its header describes "
                        f"{8 + length + end}", where=str(path), fix="re-download or re-create the base model")
    return Shard(path=path, data_start=8 + length, entries=entries)




# ---------------------------------------------------------------- side files


def copy_side_files(base_dir: Path, out_dir: Path) -> list[str]:
    """config.json, generation_config.json, tokenizer files, license and readme: every top-level file but weights."""
    copied = []
    for path in sorted(side_files(base_dir)):
        shutil.copyfile(path, out_dir / path.name)  # follows hub-cache symlinks: the copy is a real file
        copied.append(path.name)
    if INDEX in {p.name for p in base_dir.iterdir()}:
        shutil.copyfile(base_dir / INDEX, out_dir / INDEX)  # same names, shards and sizes as the base
        copied.append(INDEX)
    return copied


def side_files(base_dir: Path) -> list[Path]:
    return [p for p in Path(base_dir).iterdir()
            if p.is_file() and p.name not in NOT_COPIED and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.startswith(".")]


def side_files_size(base_dir: Path) -> int:
    return sum(p.stat().st_size for p in side_files(base_dir))
