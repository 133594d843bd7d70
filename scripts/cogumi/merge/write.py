"""Writing the merged shards: W + scale * (B @ A) in fp32, rounded once, every other tensor copied as raw bytes.

Memory: untouched tensors are copied through a small buffer and each LoRA target is read with a plain file read
(not an mmap, whose touched pages stay resident until the shard is closed), so the peak is a few tensors' working
sets, not a shard and never the model. Each output shard reuses its base shard's header: same names, dtypes,
shapes and offsets, so every untouched tensor is byte-identical by construction.

Speed: shards are written in parallel (reading, merging, hashing and writing all release the GIL), and each
shard's sha256 is computed from the bytes on their way to the disk, so the integrity hash costs no extra read.
Crash safety: each shard is flushed to disk in the background as it grows (an fdatasync on its own thread every
FLUSH_EVERY bytes, while the writer goes on), so the fsync that must happen before the folder is renamed finds
little left to write.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections import deque
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from cogumi.core.errors import UserError
from cogumi.core.guards import FIX_QUANTIZED
from cogumi.merge.inputs import Adapter, Shard
from cogumi.merge.plan import Update

DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}
COPY_CHUNK = 16 << 20  # raw-copy read size: bounded memory, few syscalls
BLOCK_ELEMENTS = 1 << 19  # rows of W merged at a time on the CPU: a 2 MB fp32 block fits in cache
FLUSH_EVERY = 1 << 30  # start writeback of each shard every GiB, so the final fsync is short
MAX_PARALLEL_SHARDS = 4  # each in-flight shard holds a few tensors in memory


@dataclass
class Written:
    consumed: set[str]  # adapter keys merged
    sha256: dict[str, str]  # shard file name -> sha256 of the whole file as written
    # seconds summed over shards (they overlap in time): where the write step's time goes
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(STAGES, 0.0))


STAGES = ("read", "merge", "hash", "write", "flush")

# safetensors' get_tensor slices a torch storage, which may import lazily: from several shard threads at once this
# hung a CPU merge on torch 2.3.1 (every thread parked on a futex, ISSUES_LOG B32). Adapter tensors are small, so
# their reads take turns; the base's bytes are read with plain file reads and stay parallel.
_ADAPTER_READS = threading.Lock()


class _AdapterTensors:
    """One shard thread's safe_open handle, read under the shared lock."""

    def __init__(self, handle):
        self.handle = handle

    def get_tensor(self, name: str) -> torch.Tensor:
        with _ADAPTER_READS:
            return self.handle.get_tensor(name)


class Stopped(Exception):
    """Another shard's writer failed (or Ctrl-C): this one stopped early; its file is incomplete."""


def stream_merge(shards: list[Shard], updates: dict[str, Update], adapter: Adapter, out_dir: Path,
                 device: str = "cpu", workers: int | None = None) -> Written:
    """Write every merged shard into out_dir, several at once; the first failure stops the others and is raised."""
    from tqdm import tqdm

    workers = workers or max(1, min(len(shards), MAX_PARALLEL_SHARDS, os.cpu_count() or 1))
    written = Written(consumed=set(), sha256={})
    stop = threading.Event()
    total = sum(s.path.stat().st_size for s in shards)
    with tqdm(total=total, desc="merge", unit="B", unit_scale=True) as bar, \
            _torch_threads(1 if device == "cpu" else None), ThreadPoolExecutor(workers, "merge-shard") as pool:
        futures = [pool.submit(_write_shard, s, out_dir / s.path.name, updates, adapter, device, stop, bar)
                   for s in shards]
        try:
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            failed = [f for f in done if f.exception() and not isinstance(f.exception(), Stopped)]
            if failed:
                raise failed[0].exception()
        except BaseException:
            stop.set()  # Ctrl-C or one shard failed: the others stop at their next tensor
            wait(futures)
            raise
    for shard, future in zip(shards, futures, strict=True):
        consumed, digest, seconds = future.result()
        written.consumed |= consumed
        written.sha256[shard.path.name] = digest
        for stage, value in seconds.items():
            written.seconds[stage] += value
    return written


def _write_shard(shard: Shard, out_path: Path, updates: dict, adapter: Adapter, device: str,
                 stop: threading.Event, bar) -> tuple[set, str, dict]:
    from safetensors import safe_open

    consumed: set[str] = set()
    with open(shard.path, "rb") as src, open(out_path, "wb") as dst, \
            safe_open(adapter.weights, framework="pt") as handle:
        tensors = _AdapterTensors(handle)
        writer = _HashingWriter(dst)
        try:
            _copy_bytes(src, writer, 0, shard.data_start)  # the base's own header: same names and offsets
            for name, info in shard.entries.items():
                if stop.is_set():
                    raise Stopped(shard.path.name)
                start, stop_at = (shard.data_start + o for o in info["data_offsets"])
                update = updates.get(name)
                if update is None:
                    _copy_bytes(src, writer, start, stop_at - start)
                else:
                    t0 = time.perf_counter()
                    weight = read_tensor(src, shard, name)
                    t1 = time.perf_counter()
                    merged = merged_tensor(weight, update, tensors, device)
                    writer.seconds["read"] += t1 - t0
                    writer.seconds["merge"] += time.perf_counter() - t1
                    if merged.numel():
                        writer.write(merged.reshape(-1).view(torch.uint8).numpy())
                    consumed.update(update.keys)
                bar.update(stop_at - start)
        finally:
            writer.close()
        t0 = time.perf_counter()
        os.fsync(dst.fileno())  # before the folder is renamed: its name must never point at unflushed data
        writer.seconds["flush"] += time.perf_counter() - t0
    return consumed, writer.hexdigest(), writer.seconds


@contextmanager
def _torch_threads(count: int | None):
    """The CPU merge runs on one torch thread per shard: its cache-sized blocks are too small to split, and on a
    shared machine an OpenMP team waiting at every block's barrier measured 2-5x slower than one thread."""
    before = torch.get_num_threads()
    if count:
        torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _HashingWriter:
    """Hashes and writes one file on a background thread, in order, with at most `depth` buffers pending: the
    disk write of one tensor overlaps the merge of the next. Memory: `depth` buffers of at most one tensor."""

    def __init__(self, fh, depth: int = 2):
        self.fh, self.depth, self.pending = fh, depth, deque()
        self.digest, self.unflushed = hashlib.sha256(), 0
        self.seconds = dict.fromkeys(STAGES, 0.0)  # "read"/"merge" are the caller's; the rest this writer's
        self.pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-writer")
        self.flusher = ThreadPoolExecutor(max_workers=1, thread_name_prefix="merge-flush")
        self.flushing = None

    def write(self, data) -> None:
        self.pending.append(self.pool.submit(self._write, data))
        while len(self.pending) > self.depth:
            self.pending.popleft().result()  # re-raises a failed write (disk full) here, in the merge

    def _write(self, data) -> None:
        t0 = time.perf_counter()
        self.digest.update(data)
        t1 = time.perf_counter()
        self.fh.write(data)
        t2 = time.perf_counter()
        self.seconds["hash"] += t1 - t0
        self.seconds["write"] += t2 - t1
        self.unflushed += len(data)
        if self.unflushed >= FLUSH_EVERY and (self.flushing is None or self.flushing.done()):
            # writeback in the background: the writer keeps writing while the disk catches up (an inline
            # fdatasync stopped this shard's pipeline for every GiB)
            self.fh.flush()
            if self.flushing is not None:
                self.flushing.result()
            self.flushing = self.flusher.submit(os.fdatasync, self.fh.fileno())
            self.unflushed = 0

    def hexdigest(self) -> str:
        return self.digest.hexdigest()

    def close(self) -> None:
        try:
            while self.pending:
                self.pending.popleft().result()
            self.fh.flush()
            if self.flushing is not None:
                t0 = time.perf_counter()
                self.flushing.result()
                self.seconds["flush"] += time.perf_counter() - t0
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)
            self.flusher.shutdown(wait=True)


def _copy_bytes(src, writer: _HashingWriter, offset: int, length: int) -> None:
    src.seek(offset)
    while length:
        t0 = time.perf_counter()
        chunk = src.read(min(length, COPY_CHUNK))  # a fresh buffer each time: the writer may still hold the last
        writer.seconds["read"] += time.perf_counter() - t0
        if not chunk:
            raise UserError(f"{src.name} ended early", where=src.name, fix="re-download or re-create the base")
        writer.write(chunk)
        length -= len(chunk)


def read_tensor(src, shard: Shard, name: str) -> torch.Tensor:
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
