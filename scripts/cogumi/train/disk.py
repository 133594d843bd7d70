"""Disk sizing before training, and the monitor sidecar during it (ISSUES_LOG O3).

The per-save room check lives in cogumi.train.checkpoints; this module answers "will the whole run fit?" before the base
model loads, and runs scripts/monitor_disk.py beside the trainer so a human sees the disk fill up in time.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

from cogumi.core.config import resolve_path
from cogumi.core.errors import UserError
from cogumi.core.fsutil import free_bytes
from cogumi.core.paths import SCRIPTS_DIR
from cogumi.train.checkpoints import human_bytes, list_complete, measured_checkpoint_size, what_to_free

log = logging.getLogger(__name__)

MONITOR = SCRIPTS_DIR / "monitor_disk.py"
# Scheduler, data position, the python/numpy/torch/cuda RNG states, adapter_config/README and the COMPLETE marker:
# ~45 KB measured on the tiny model (trainer_state.pt holds the moments plus ~38 KB). 128 KiB keeps a margin; 1 MiB
# made the demo's estimate 2.65 MB against 1.65 MB on disk and refused a disk that would have fit.
STATE_OVERHEAD_BYTES = 128 * 1024
# torch.save / safetensors framing per tensor (headers, alignment): well under 1 % for 8B-sized LoRA tensors.
FORMAT_OVERHEAD = 0.02
STOP_TIMEOUT_S = 10


def estimate_checkpoint_bytes(trainable_params: int, param_bytes: int = 4) -> int:
    """Bytes of one resumable checkpoint: adapter + AdamW's two moments (same dtype as the parameters)
    + trainer/scheduler/RNG state.

    fp32 LoRA weights (peft keeps adapters in fp32 even on a bf16 base) make it 12 bytes per trainable parameter,
    plus 2 % format overhead and 1 MiB of state: Llama-3.1-8B all-linear r=16 (41.9 M parameters) -> 0.51 GB.
    A measured checkpoint replaces this estimate as soon as one exists.
    """
    tensors = 3 * trainable_params * param_bytes
    return int(tensors * (1 + FORMAT_OVERHEAD)) + STATE_OVERHEAD_BYTES


def _mount_key(path: Path) -> tuple[int, Path]:
    """(st_dev, nearest existing folder): two paths on the same filesystem share the space they need."""
    probe = Path(path).absolute()
    while not probe.exists():
        probe = probe.parent
    return os.stat(probe).st_dev, probe


def _used_pct(path: Path) -> float:
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    avail = st.f_bavail * st.f_frsize
    return 100.0 * used / (used + avail) if used + avail else 0.0


def preflight(config, *, checkpoint_bytes_estimate: int, merged_bytes_estimate: int) -> None:
    """Refuse to start a run that cannot finish on this disk; warn above disk.warn % used.

    Needs at the peak: keep_last + 1 checkpoints (a new one is written before the oldest is deleted) + the merged
    model this phase will write + the save margin. Checkpoints already in the run folder are counted as space the
    run has (resume), and a measured checkpoint replaces the estimate. The base model download is checked where
    the hub cache lives, by the trainer's hub check, not here.
    """
    run_dir = Path(config.run_dir)
    keep = config.checkpoints.keep_last
    margin = config.disk.margin_mb * 1024 * 1024
    measured = measured_checkpoint_size(run_dir)
    one = measured if measured is not None else checkpoint_bytes_estimate
    source = "measured" if measured is not None else "estimated"
    have = min(len(list_complete(run_dir)), keep)  # existing checkpoints will be recycled, not added to
    ckpt_need = (keep + 1 - have) * one
    merged_dir = Path(config.merged_dir)
    merged_need = merged_bytes_estimate

    needs: dict[int, list] = {}  # st_dev -> [folder, bytes]: the merged model may live on another disk
    for path, amount in ((run_dir, ckpt_need + margin), (merged_dir, merged_need)):
        dev, probe = _mount_key(path)
        entry = needs.setdefault(dev, [probe, 0])
        entry[1] += amount

    for probe, need in needs.values():
        free = free_bytes(probe)
        pct = _used_pct(probe)
        detail = (f"{keep + 1} checkpoints x {human_bytes(one)} ({source}; {have} already on disk) + merged model "
                  f"{human_bytes(merged_need)} + margin {human_bytes(margin)}")
        if free < need:
            raise UserError(
                f"not enough disk for this run: {human_bytes(free)} free on the filesystem of {probe}, "
                f"{human_bytes(need)} needed ({detail}; {pct:.0f}% used)",
                where=str(run_dir),
                fix=what_to_free(run_dir, need - free),
            )
        if pct >= config.disk.warn:
            log.warning("disk %s is %.0f%% used (warn at %g%%): %s free, this run needs %s (%s)",
                        probe, pct, config.disk.warn, human_bytes(free), human_bytes(need), detail)
        else:
            log.info("disk ok: %s free at %s, this run needs %s (%s)", human_bytes(free), probe,
                     human_bytes(need), detail)


def monitor_command(config) -> list[str]:
    disk = config.disk
    watch = resolve_path(disk.path) if disk.path else Path(config.run_dir)
    return [sys.executable, str(MONITOR), "--path", str(watch), "--interval", str(disk.interval),
            "--warn", str(disk.warn), "--alert", str(disk.alert), "--critical", str(disk.critical),
            "--checkpoints", str(config.run_dir), "--keep", str(config.checkpoints.keep_last),
            "--parent-pid", str(os.getpid())]


@contextmanager
def sidecar(config):
    """Run monitor_disk.py beside the block; stop it in `finally` however the block ends.

    Readings go to run_dir/monitor_disk.log (warn or worse also reach the terminal through stderr). If this process
    is killed -9, `finally` cannot run, so the monitor gets --parent-pid and exits on its own within a second.
    Yields the Popen, or None when disk.monitor is off.
    """
    if not config.disk.monitor:
        yield None
        return
    run_dir = Path(config.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "monitor_disk.log", "a", encoding="utf-8") as logfile:
        proc = subprocess.Popen(monitor_command(config), stdout=logfile, stdin=subprocess.DEVNULL)
    log.info("disk monitor started (pid %d, every %ss, log %s)", proc.pid, config.disk.interval,
             run_dir / "monitor_disk.log")
    try:
        yield proc
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, wait, then SIGKILL: the monitor never outlives the trainer."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    log.info("disk monitor stopped (exit %s)", proc.returncode)
