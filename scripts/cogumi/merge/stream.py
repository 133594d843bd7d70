"""The streaming LoRA merge, start to end: refuse early, write the shards, verify, then place the folder.

Order of run_merge: every refusal (quantized base or adapter, adapter hash, lineage, unsupported adapter, corrupt
shard, existing output, disk) happens before the first byte is written (inputs.py, plan.py); shards are written
into a temporary sibling folder (write.py), which is renamed to the final name only after verification (verify.py)
passed and the report and manifest were written; output_dir.py decides what is left on disk when anything fails.
"""

from __future__ import annotations

import logging
import os
import resource
import time
from dataclasses import dataclass
from pathlib import Path

from cogumi.core import fsutil
from cogumi.core.errors import UserError
from cogumi.core.manifest import sha256_file, weights_fingerprint, write_manifest
from cogumi.merge import inputs, output_dir, plan, write
from cogumi.merge.inputs import INDEX, REPORT

log = logging.getLogger(__name__)


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


def run_merge(job: MergeJob) -> dict:
    """Refuse early, stream into a temporary folder, verify, then rename (or keep aside as failed)."""
    started = time.perf_counter()
    base_dir = inputs.resolve_base(job.base_model)
    adapter = inputs.load_adapter(job.adapter_dir)
    inputs.refuse_quantized(adapter, base_dir)  # first: the incident deserves its own message
    adapter = inputs.check_adapter_hash(adapter)  # its bytes are the ones training recorded
    inputs.check_supported(adapter)
    fingerprint = inputs.check_lineage(adapter, job.base_model, base_dir)
    shards = inputs.scan_base(base_dir)
    updates = plan.plan_updates(adapter, shards)
    out_dir = Path(job.out_dir)
    output_dir.refuse_existing(out_dir, job.force)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    live_leftovers = output_dir.reclaim_dead_merges(out_dir)
    output_dir.preflight_disk(sum(s.path.stat().st_size for s in shards), inputs.side_files_size(base_dir), out_dir,
                              job.margin_bytes, live_leftovers)
    log.info("merge: %s + %s -> %s (%d shards, %d tensors updated)", job.base_model, adapter.path, out_dir,
             len(shards), len(updates))
    checked = time.perf_counter()
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    tmp.mkdir()
    # one guard until the rename: a Ctrl-C between two steps must not leave the temporary folder behind
    with output_dir.removed_on_failure(tmp, out_dir) as step:
        written = write.stream_merge(shards, updates, adapter, tmp, job.device)
        _check_consumed(written.consumed, updates, adapter)
        output_dir.fsync_files(tmp, inputs.copy_side_files(base_dir, tmp))
        if (tmp / INDEX).exists():
            written.sha256[INDEX] = sha256_file(tmp / INDEX)
        report = _base_report(job, shards, updates, started)
        report["seconds"] = {"checks": round(checked - started, 3), "write": round(time.perf_counter() - checked, 3),
                             "write_stages_summed_over_shards": {k: round(v, 3) for k, v in written.seconds.items()}}
        return _verify_and_place(job, adapter, base_dir, fingerprint, tmp, report, written.sha256, started, step)


def _check_consumed(consumed: set, updates: dict, adapter) -> None:
    planned = {k for u in updates.values() for k in u.keys}
    if consumed != planned:
        missing = sorted(planned - consumed)[:3]
        raise UserError(f"adapter tensors were not merged: {missing}", where=str(adapter.weights),
                        fix="a bug: please report it with the adapter's adapter_config.json")


def _base_report(job: MergeJob, shards: list, updates: dict, started: float) -> dict:
    dtypes = sorted({shard.entries[k]["dtype"] for shard in shards for k in updates if k in shard.entries})
    return {"base_model": job.base_model, "adapter_dir": str(job.adapter_dir), "shards": len(shards),
            "tensors_updated": len(updates), "dtype": ",".join(dtypes),
            "merge_seconds": round(time.perf_counter() - started, 3), "peak_rss_merge_mb": peak_rss_mb()}


def _verify_and_place(job, adapter, base_dir, fingerprint, tmp: Path, report: dict, sha256: dict,
                      started: float, step: output_dir.Step) -> dict:
    out_dir = Path(job.out_dir)
    step.now = "verifying the merge"
    try:
        report["verification"] = _verification(job, adapter, base_dir, tmp, report["dtype"])
    except BaseException as err:
        if isinstance(err, KeyboardInterrupt) or output_dir.is_disk_full(err, out_dir.parent):
            raise  # the guard around removes the folder
        # a crash (out of memory, a bug): the merged weights may be fine, so they are kept when there is room
        output_dir.keep_aside(tmp, out_dir, job.margin_bytes, f"verification crashed ({type(err).__name__})")
        raise
    report["passed"] = report["verification"]["passed"] is not False
    report.update(wall_seconds=round(time.perf_counter() - started, 3), peak_rss_mb=peak_rss_mb())
    step.now = f"writing {REPORT} and the manifest"
    _write_outputs(job, adapter, base_dir, fingerprint, tmp, report, sha256)
    if not report["passed"]:
        report["output"] = str(output_dir.keep_aside(tmp, out_dir, job.margin_bytes, "verification FAILED"))
        return report
    step.now = "putting the merged model in place"
    if out_dir.exists():
        log.info("FORCE=1: the previous output moved aside to %s", fsutil.move_aside(out_dir, "old"))
    os.replace(tmp, out_dir)
    report["output"] = str(out_dir)
    return report


def _verification(job: MergeJob, adapter, base_dir: Path, tmp: Path, dtype: str) -> dict:
    if not job.verify:
        return {"skipped": True, "passed": None,
                "reason": "--no-verify (or merge.verify=false): the merged model was not compared with base + adapter"}
    from cogumi.merge.verify import verify_merge

    return verify_merge(base_dir, adapter.path, tmp, prompts=job.verify_prompts, max_abs_diff=job.max_abs_diff,
                        min_top1=job.min_top1_agreement, dtype=dtype)


def _write_outputs(job, adapter, base_dir, fingerprint, folder: Path, report: dict, sha256: dict) -> None:
    """The report, then the manifest last: a folder with a manifest is a finished merge. `weights_sha256` (every
    weight file and the index, hashed as written) is what validation and the next phase check the folder against."""
    fsutil.atomic_write_json(folder / REPORT, report)
    verification = report["verification"]
    write_manifest(folder, "merged", base_model=job.base_model, base_path=str(base_dir),
                   base_fingerprint=fingerprint, adapter_dir=str(adapter.path), adapter_hash=adapter.sha256,
                   adapter_manifest=adapter.manifest, config_hash=job.config_hash, dtype=report["dtype"],
                   weights_fingerprint=weights_fingerprint(folder), weights_sha256=dict(sorted(sha256.items())),
                   verified="skipped" if verification.get("skipped") else verification["passed"])
    output_dir.fsync_files(folder, [])  # the folder's entries, before it is renamed


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
