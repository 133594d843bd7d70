"""Streaming LoRA merge: the base's safetensors shards one at a time, W + scale * (B @ A) in fp32, rounded once.

Memory: untouched tensors are copied as raw bytes through a small buffer and each LoRA target is read with a
plain file read (not an mmap, whose touched pages stay resident until the shard is closed), so the peak is one
tensor's fp32 working set, not a shard and never the model. Each output shard reuses its base shard's header:
same names, dtypes, shapes and offsets, so every untouched tensor is byte-identical by construction.

Order of run_merge: every refusal (quantized base or adapter, lineage, unsupported adapter, corrupt shard,
existing output, disk) happens before the first byte is written; shards go to a temporary sibling folder that
is renamed to the final name only after verification passed (merge_verify.py), else it is kept aside as failed.
"""

from __future__ import annotations

import logging
import math
import os
import re
import resource
import shutil
import struct
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import torch

from cogumi.core import fsutil, hub
from cogumi.core.config import resolve_path
from cogumi.core.errors import UserError
from cogumi.core.guards import FIX_QUANTIZED, WHY_QUANTIZED, quantization_reasons, refuse_quantized_base
from cogumi.core.manifest import MANIFEST, read_manifest, sha256_file, weights_fingerprint, write_manifest
from cogumi.core.safetensors_io import read_header, tensor_entries, weight_files

log = logging.getLogger(__name__)

ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
INDEX = "model.safetensors.index.json"
REPORT = "merge_report.json"
PEFT_PREFIX = "base_model.model."
DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
# adapter key suffix -> (kind, role); peft saves Linear/Conv1D LoRA as modules, Embedding LoRA as parameters.
LORA_SUFFIXES = {".lora_A.weight": ("linear", "A"), ".lora_B.weight": ("linear", "B"),
                 ".lora_embedding_A": ("embedding", "A"), ".lora_embedding_B": ("embedding", "B")}
COPY_CHUNK = 16 << 20  # raw-copy read size: bounded memory, few syscalls
BLOCK_ELEMENTS = 1 << 19  # rows of W merged at a time on the CPU: a 2 MB fp32 block fits in cache
# Top-level files of a base folder that are not carried into the merged folder (weights are rewritten;
# a previous phase's manifest, report and validation stamp describe that phase, not this merge).
NOT_COPIED = {INDEX, MANIFEST, REPORT, "VALIDATED"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".msgpack", ".h5", ".ckpt")


@dataclass(frozen=True)
class MergeJob:
    """Everything one merge needs, resolved from the phase config by the entry script."""

    base_model: str  # as written in the config (hub id or folder)
    adapter_dir: Path
    out_dir: Path
    verify: bool = True
    verify_prompts: int = 4
    max_abs_diff: float | None = None
    min_top1_agreement: float = 0.99
    force: bool = False
    margin_bytes: int = 1 << 30
    device: str = "cpu"  # where B @ A and the add run; verification picks its own device
    config_hash: str | None = None


@dataclass(frozen=True)
class Adapter:
    path: Path
    config: dict
    manifest: dict
    weights: Path


@dataclass(frozen=True)
class Update:
    """What happens to one base tensor: a LoRA delta added, and/or (modules_to_save, saved embedding layers,
    trained biases) the base value replaced by the adapter's copy first, as peft does when it loads them."""

    base_key: str
    kind: str  # "linear" | "embedding" | "replace"
    keys: tuple[str, ...]  # adapter tensors consumed: (A, B), (A, B, replacement) or (replacement,)
    scale: float = 1.0
    transpose: bool = False

    @property
    def replacement(self) -> str | None:
        return self.keys[-1] if self.kind == "replace" or len(self.keys) == 3 else None


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
    return Adapter(path=adapter_dir, config=fsutil.read_json(adapter_dir / ADAPTER_CONFIG),
                   manifest=read_manifest(adapter_dir), weights=adapter_dir / ADAPTER_WEIGHTS)


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


# ---------------------------------------------------------------- the plan: which adapter tensor goes where


def plan_updates(adapter: Adapter, shards: list[Shard]) -> dict[str, Update]:
    """Map every adapter tensor onto exactly one base tensor; an adapter key that fits nothing is an error."""
    from safetensors import safe_open

    try:
        with safe_open(adapter.weights, framework="pt") as fh:
            shapes = {key: tuple(fh.get_slice(key).get_shape()) for key in fh.keys()}
    except Exception as err:  # safetensors raises its own error type for a corrupt file
        raise UserError(f"cannot read {adapter.weights.name}: {err}", where=str(adapter.weights),
                        fix="the adapter file is corrupt: re-save it from the last checkpoint") from err
    base_shapes = {name: tuple(info["shape"]) for shard in shards for name, info in shard.entries.items()}
    modules, replacements, updates = {}, {}, {}
    for key in shapes:
        name = _strip_prefix(key, adapter)
        suffix = next((s for s in LORA_SUFFIXES if name.endswith(s)), None)
        if suffix:
            kind, role = LORA_SUFFIXES[suffix]
            modules.setdefault((name[: -len(suffix)], kind), {})[role] = key
        elif "lora_" in name:
            raise UserError(f"adapter tensor '{key}' is of a kind the streaming merge does not know",
                            where=str(adapter.weights), fix="merge this adapter with peft's merge_and_unload")
        else:  # a LoRA-wrapped layer saved whole keeps `.base_layer` in its name
            replacements[name.replace(".base_layer.", ".")] = key
    for (module, kind), roles in modules.items():
        if set(roles) != {"A", "B"}:
            raise UserError(f"adapter module '{module}' has lora_{''.join(roles)} but not both A and B",
                            where=str(adapter.weights), fix="the adapter file is incomplete: re-save it")
        base_key = f"{module}.weight"
        replaced = (replacements.pop(base_key),) if base_key in replacements else ()
        transpose = kind == "embedding" or bool(adapter.config.get("fan_in_fan_out"))
        update = Update(base_key=base_key, kind=kind, keys=(roles["A"], roles["B"], *replaced),
                        scale=lora_scale(module, adapter.config, shapes[roles["A"]][0]), transpose=transpose)
        _add(updates, update, base_shapes, adapter)
    for base_key, key in replacements.items():
        _add(updates, Update(base_key=base_key, kind="replace", keys=(key,)), base_shapes, adapter)
    return updates


def _strip_prefix(key: str, adapter: Adapter) -> str:
    if not key.startswith(PEFT_PREFIX):
        raise UserError(f"adapter tensor '{key}' does not start with '{PEFT_PREFIX}'", where=str(adapter.weights),
                        fix="save adapters with peft's save_pretrained")
    return key[len(PEFT_PREFIX):]


def _add(updates: dict, update: Update, base_shapes: dict, adapter: Adapter) -> None:
    if update.base_key not in base_shapes:
        raise UserError(f"adapter tensor '{update.keys[0]}' targets '{update.base_key}', which the base does not "
                        f"have", where=str(adapter.weights),
                        fix="this adapter belongs to another architecture, or targets a tied weight")
    if update.base_key in updates:
        raise UserError(f"two adapter entries change '{update.base_key}'", where=str(adapter.weights),
                        fix="the adapter is inconsistent: re-save it from training")
    updates[update.base_key] = update


def lora_scale(module: str, config: dict, rank: int) -> float:
    """peft 0.12's scaling: the first rank/alpha pattern key matching `.*\\.<key>$` picks both r and alpha."""
    rank_pattern, alpha_pattern = config.get("rank_pattern") or {}, config.get("alpha_pattern") or {}
    key = next((k for k in chain(rank_pattern, alpha_pattern) if re.match(rf".*\.{k}$", module)), module)
    r, alpha = rank_pattern.get(key, config["r"]), alpha_pattern.get(key, config["lora_alpha"])
    if r != rank:
        raise UserError(f"adapter module '{module}' has rank {rank} but adapter_config.json gives it r={r}",
                        where="adapter_config.json r / rank_pattern",
                        fix="the config and the weights disagree: re-save the adapter from training")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


# ---------------------------------------------------------------- streaming


def refuse_existing(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise UserError(f"the merged output already exists: {out_dir}", where=str(out_dir),
                        fix="run with FORCE=1 to replace it (the old one is moved aside, not deleted)")
    for stale in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        log.warning("a temporary folder of an interrupted merge is still here, using disk: %s", stale)


def preflight_disk(shards: list[Shard], base_dir: Path, out_dir: Path, margin: int) -> int:
    need = sum(s.path.stat().st_size for s in shards) + _side_files_size(base_dir) + margin
    free = fsutil.free_bytes(out_dir.parent)
    if free < need:
        raise UserError(f"not enough disk for the merged model: {free / 2**30:.1f} GiB free, "
                        f"{need / 2**30:.1f} GiB needed (weights + {margin / 2**30:.1f} GiB margin)",
                        where=str(out_dir.parent), fix="free space there, or set output_root to a bigger disk")
    return need


def stream_merge(shards: list[Shard], updates: dict[str, Update], adapter: Adapter, out_dir: Path,
                 device: str = "cpu") -> set[str]:
    """Write every merged shard into out_dir; returns the adapter keys consumed."""
    from safetensors import safe_open
    from tqdm import tqdm

    consumed: set[str] = set()
    with safe_open(adapter.weights, framework="pt") as tensors, _torch_threads(1 if device == "cpu" else None):
        for shard in tqdm(shards, desc="merge", unit="shard"):
            _write_shard(shard, out_dir / shard.path.name, updates, tensors, device, consumed)
    return consumed


def _write_shard(shard: Shard, out_path: Path, updates: dict, tensors, device: str, consumed: set) -> None:
    with open(shard.path, "rb") as src, open(out_path, "wb") as dst:
        writer = _OrderedWriter(dst)
        try:
            _copy_bytes(src, writer, 0, shard.data_start)  # the base's own header: same names and offsets
            for name, info in shard.entries.items():
                start, stop = (shard.data_start + o for o in info["data_offsets"])
                update = updates.get(name)
                if update is None:
                    _copy_bytes(src, writer, start, stop - start)
                    continue
                merged = merged_tensor(_read_tensor(src, shard, name), update, tensors, device)
                if merged.numel():
                    writer.write(merged.reshape(-1).view(torch.uint8).numpy())
                consumed.update(update.keys)
        finally:
            writer.close()
        dst.flush()
        os.fsync(dst.fileno())


@contextmanager
def _torch_threads(count: int | None):
    """The CPU merge runs on one torch thread: its cache-sized blocks are too small to split, and on a shared
    machine an OpenMP team waiting at every block's barrier measured 2-5x slower than one thread."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _OrderedWriter:
    """Writes to one file on a background thread, in order, with at most `depth` buffers pending: the disk
    write of one tensor overlaps the merge of the next (file writes and torch ops both release the GIL).
    Memory: `depth` pending buffers, each at most one tensor in the base dtype."""

    def __init__(self, fh, depth: int = 2):
        self.fh, self.depth, self.pending = fh, depth, deque()
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-writer")

    def write(self, data) -> None:
        self.pending.append(self.pool.submit(self.fh.write, data))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()  # re-raises a failed write (disk full) here, in the merge

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _copy_bytes(src, writer: _OrderedWriter, offset: int, length: int) -> None:
    src.seek(offset)
    while length:
        chunk = src.read(min(length, COPY_CHUNK))  # a fresh buffer each time: the writer may still hold the last
        if not chunk:
            raise UserError(f"{src.name} ended early", where=src.name, fix="re-download or re-create the base")
        writer.write(chunk)
        length -= len(chunk)


def _read_tensor(src, shard: Shard, name: str) -> torch.Tensor:
    info = shard.entries[name]
    if info["dtype"] not in DTYPES:
        raise UserError(f"{shard.path.name}: LoRA target '{name}' is stored as {info['dtype']}, not a float",
                        where=str(shard.path), fix=FIX_QUANTIZED)
    start, stop = info["data_offsets"]
    data = bytearray(stop - start)
    src.seek(shard.data_start + start)
    if src.readinto(data) != len(data):
        raise UserError(f"{shard.path.name} ended early", where=str(shard.path), fix="re-download the base")
    if not data:
        return torch.empty(info["shape"], dtype=DTYPES[info["dtype"]])
    return torch.frombuffer(data, dtype=DTYPES[info["dtype"]]).reshape(info["shape"])


def merged_tensor(weight: torch.Tensor, update: Update, tensors, device: str = "cpu") -> torch.Tensor:
    """W + scale * (B @ A) in fp32, rounded once to W's dtype (a bf16 delta added in bf16 would round twice)."""
    weight_dtype = weight.dtype
    if update.replacement:
        new = tensors.get_tensor(update.replacement)
        _check_shape(update, tuple(new.shape), tuple(weight.shape))
        # peft loads the saved copy into the base layer (in the base's dtype) before any delta applies
        weight = new.to(weight_dtype)
    if update.kind == "replace":
        return weight
    a, b = (tensors.get_tensor(k).to(device=device, dtype=torch.float32) for k in update.keys[:2])
    a = a * update.scale  # scaling the small r x in matrix costs nothing; scaling the product would cost a pass
    left, right = (a.T, b.T) if update.transpose else (b, a)  # (B @ A).T == A.T @ B.T
    _check_shape(update, (left.shape[0], right.shape[1]), tuple(weight.shape))
    return _add_product(weight, left, right, device)


def _add_product(weight: torch.Tensor, left: torch.Tensor, right: torch.Tensor, device: str) -> torch.Tensor:
    """weight + left @ right summed in fp32 and rounded once to weight's dtype, a block of rows at a time.

    On the CPU the fp32 block stays in cache: upcast, GEMM-accumulate and round each touch it once, where
    whole-tensor passes over a 46 MB fp32 copy were the merge's bottleneck (measured 3-6x slower).
    """
    rows = weight.shape[0] if device != "cpu" else max(1, BLOCK_ELEMENTS // max(1, weight.shape[1]))
    out = torch.empty_like(weight)
    block = torch.empty((min(rows, weight.shape[0]), weight.shape[1]), dtype=torch.float32, device=device)
    for start in range(0, weight.shape[0], rows):
        acc = block[: min(rows, weight.shape[0] - start)]
        acc.copy_(weight[start: start + len(acc)])  # exact bf16 -> fp32 (and onto the device)
        acc.addmm_(left[start: start + len(acc)], right)
        out[start: start + len(acc)].copy_(acc)  # the one rounding (and back to the CPU)
    return out


def _check_shape(update: Update, got: tuple, want: tuple) -> None:
    if got != want:
        raise UserError(f"adapter update for '{update.base_key}' has shape {got}, the base weight {want}",
                        where=update.keys[0], fix="check fan_in_fan_out in adapter_config.json, or the base model")


def copy_side_files(base_dir: Path, out_dir: Path) -> list[str]:
    """config.json, generation_config.json, tokenizer files, license and readme: every top-level file but weights."""
    copied = []
    for path in sorted(_side_files(base_dir)):
        shutil.copyfile(path, out_dir / path.name)  # follows hub-cache symlinks: the copy is a real file
        copied.append(path.name)
    if INDEX in {p.name for p in base_dir.iterdir()}:
        shutil.copyfile(base_dir / INDEX, out_dir / INDEX)  # same names, shards and sizes as the base
    return copied


def _side_files(base_dir: Path) -> list[Path]:
    return [p for p in Path(base_dir).iterdir()
            if p.is_file() and p.name not in NOT_COPIED and not p.name.endswith(WEIGHT_SUFFIXES)
            and not p.name.startswith(".")]


def _side_files_size(base_dir: Path) -> int:
    return sum(p.stat().st_size for p in _side_files(base_dir))


# ---------------------------------------------------------------- the whole merge


def run_merge(job: MergeJob) -> dict:
    """Refuse early, stream into a temporary folder, verify, then rename (or keep aside as failed)."""
    started = time.perf_counter()
    base_dir = resolve_base(job.base_model)
    adapter = load_adapter(job.adapter_dir)
    refuse_quantized(adapter, base_dir)  # before lineage: the incident deserves its own message
    check_supported(adapter)
    fingerprint = check_lineage(adapter, job.base_model, base_dir)
    shards = scan_base(base_dir)
    updates = plan_updates(adapter, shards)
    out_dir = Path(job.out_dir)
    refuse_existing(out_dir, job.force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    preflight_disk(shards, base_dir, out_dir, job.margin_bytes)
    log.info("merge: %s + %s -> %s (%d shards, %d tensors updated)", job.base_model, adapter.path, out_dir,
             len(shards), len(updates))
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    try:
        consumed = stream_merge(shards, updates, adapter, tmp, job.device)
        _check_consumed(consumed, updates, adapter)
        copy_side_files(base_dir, tmp)
    except BaseException:
        shutil.rmtree(tmp)  # our own incomplete temporary folder; nothing under the final name was touched
        raise
    report = _base_report(job, shards, updates, started)
    return _verify_and_place(job, adapter, base_dir, fingerprint, tmp, report, started)


def _check_consumed(consumed: set, updates: dict, adapter: Adapter) -> None:
    planned = {k for u in updates.values() for k in u.keys}
    if consumed != planned:
        missing = sorted(planned - consumed)[:3]
        raise UserError(f"adapter tensors were not merged: {missing}", where=str(adapter.weights),
                        fix="a bug: please report it with the adapter's adapter_config.json")


def _base_report(job: MergeJob, shards: list[Shard], updates: dict, started: float) -> dict:
    dtypes = sorted({shard.entries[k]["dtype"] for shard in shards for k in updates if k in shard.entries})
    return {"base_model": job.base_model, "adapter_dir": str(job.adapter_dir), "shards": len(shards),
            "tensors_updated": len(updates), "dtype": ",".join(dtypes),
            "merge_seconds": round(time.perf_counter() - started, 3), "peak_rss_merge_mb": peak_rss_mb()}


def _verify_and_place(job, adapter, base_dir, fingerprint, tmp: Path, report: dict, started: float) -> dict:
    out_dir = Path(job.out_dir)
    try:
        if job.verify:
            from cogumi.merge.verify import verify_merge

            report["verification"] = verify_merge(base_dir, adapter.path, tmp, prompts=job.verify_prompts,
                                                  max_abs_diff=job.max_abs_diff,
                                                  min_top1=job.min_top1_agreement, dtype=report["dtype"])
        else:
            report["verification"] = {"skipped": True, "passed": None,
                                      "reason": "--no-verify (or merge.verify=false): the merged model was not "
                                                "compared with base + adapter"}
        report["passed"] = report["verification"]["passed"] is not False
        report.update(wall_seconds=round(time.perf_counter() - started, 3), peak_rss_mb=peak_rss_mb())
        _write_outputs(job, adapter, base_dir, fingerprint, tmp, report)
    except BaseException:
        log.error("verification did not finish; the merged model is kept at %s",
                  _place(tmp, fsutil.aside_name(out_dir, "failed")))
        raise
    if not report["passed"]:
        report["output"] = str(_place(tmp, fsutil.aside_name(out_dir, "failed")))
        return report
    if out_dir.exists():
        log.info("FORCE=1: the previous output moved aside to %s", fsutil.move_aside(out_dir, "old"))
    report["output"] = str(_place(tmp, out_dir))
    return report


def _write_outputs(job, adapter, base_dir, fingerprint, folder: Path, report: dict) -> None:
    fsutil.atomic_write_json(folder / REPORT, report)
    verification = report["verification"]
    write_manifest(folder, "merged", base_model=job.base_model, base_path=str(base_dir),
                   base_fingerprint=fingerprint, adapter_dir=str(adapter.path),
                   adapter_hash=sha256_file(adapter.weights), adapter_manifest=adapter.manifest,
                   config_hash=job.config_hash, dtype=report["dtype"], weights_fingerprint=weights_fingerprint(folder),
                   verified="skipped" if verification.get("skipped") else verification["passed"])


def _place(tmp: Path, target: Path) -> Path:
    os.replace(tmp, target)
    return target


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB.

    VmHWM rather than ru_maxrss: a process started by vfork + exec (Python's subprocess) inherits its parent's
    peak in ru_maxrss, so a merge launched from a big parent would report the parent's memory.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux
