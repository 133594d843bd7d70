"""Where the merge's bytes land, and what is left on disk when something goes wrong.

The merged folder is written under a temporary sibling name and renamed only after verification and the report.
Nothing half-written ever carries the final name. On a full disk (during the shards, the report or the manifest)
the temporary folder is removed and the merge stops with exit 3: free space, run the same command again. On Ctrl-C
it is removed too. A merge that failed verification (or crashed in it) is kept aside for inspection only when the
disk still has room for a fresh merge next to it; otherwise only its report is kept, and the log says which.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from contextlib import contextmanager
from pathlib import Path

from cogumi.core import fsutil
from cogumi.core.errors import EXIT_DISK_STOP, UserError
from cogumi.core.manifest import MANIFEST
from cogumi.merge.inputs import REPORT

log = logging.getLogger(__name__)


class MergeDiskStop(UserError):
    """The disk filled during the merge: nothing was kept under the final name; the same command finishes later."""

    exit_code = EXIT_DISK_STOP


def human_bytes(n: float) -> str:
    """12.3 MiB / 4.0 GiB: a readable size at any scale (a tiny disk used to read '0.0 GiB free, 0.0 GiB needed')."""
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def is_disk_full(err: BaseException, folder: Path) -> bool:
    """ENOSPC/EDQUOT anywhere in the exception chain, safetensors' text for it, or (no errno at all) a disk
    with less than 1 MiB left."""
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "No space left on device" in str(seen) or "os error 28" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return isinstance(err, OSError | RuntimeError) and fsutil.free_bytes(folder) < (1 << 20)


def refuse_existing(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not force:
        raise UserError(f"the merged output already exists: {out_dir}", where=str(out_dir),
                        fix="run with FORCE=1 to replace it (the old one is moved aside, not deleted)")


def reclaim_dead_merges(out_dir: Path) -> list[Path]:
    """Remove the temporary folders of merges into `out_dir` whose process is gone (kill -9, power loss: ~16 GB
    each for the 8B); return the ones still owned by a live process. The caller holds the run lock, so no other
    merge of this run is writing; the pid check also covers a merge started without it."""
    alive = []
    for stale in sorted(out_dir.parent.glob(f".{out_dir.name}.tmp-*")):
        pid = stale.name.rsplit("-", 1)[-1]
        size = fsutil.dir_size(stale)
        if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(stale, ignore_errors=True)
            if not stale.exists():
                log.warning("removed the temporary folder of a merge that died (pid %s is gone): %s, freed %s",
                            pid, stale, human_bytes(size))
                continue
        log.warning("a temporary folder of another merge is here, using %s: %s (its process %s is alive)",
                    human_bytes(size), stale, pid)
        alive.append(stale)
    return alive


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def preflight_disk(weights_bytes: int, side_bytes: int, out_dir: Path, margin: int,
                   leftovers: list[Path] = ()) -> int:
    need = weights_bytes + side_bytes + margin
    free = fsutil.free_bytes(out_dir.parent)
    if free < need:
        held = sum(fsutil.dir_size(path) for path in leftovers)
        also = (f"; {len(leftovers)} temporary folder(s) of live merges hold {human_bytes(held)}: "
                f"{', '.join(path.name for path in leftovers)}") if leftovers else ""
        raise UserError(f"not enough disk for the merged model: {human_bytes(free)} free, {human_bytes(need)} "
                        f"needed (weights {human_bytes(weights_bytes)} + margin {human_bytes(margin)}){also}",
                        where=str(out_dir.parent), fix="free space there, or set output_root to a bigger disk")
    return need


class Step:
    """What the merge is doing now, named in the message if it stops there."""

    def __init__(self, now: str):
        self.now = now


@contextmanager
def removed_on_failure(tmp: Path, out_dir: Path):
    """One guard from the temporary folder's creation to its rename: any failure inside removes it (it is ours and
    incomplete) and a full disk becomes exit 3. Already renamed or kept aside as failed: nothing to remove."""
    step = Step("writing the merged shards")
    try:
        yield step
    except BaseException as err:
        if not tmp.exists():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, KeyboardInterrupt):
            log.error("interrupted while %s: the partial merge was removed; run the same command again", step.now)
            raise
        if isinstance(err, UserError) or not is_disk_full(err, out_dir.parent):
            raise
        raise MergeDiskStop(f"the disk filled while {step.now}; the partial merge was removed, nothing is kept "
                            f"under {out_dir.name}", where=str(out_dir.parent),
                            fix=f"free space there ({human_bytes(fsutil.free_bytes(out_dir.parent))} free now), "
                                "then run the same command again") from err


def keep_aside(tmp: Path, out_dir: Path, margin: int, why: str) -> Path:
    """Move a failed merge aside; keep its weights only if a fresh merge would still fit next to them."""
    target = fsutil.aside_name(out_dir, "failed")
    size, free = fsutil.dir_size(tmp), fsutil.free_bytes(out_dir.parent)
    if free < size + margin:
        for path in tmp.iterdir():
            if path.name not in (REPORT, MANIFEST):
                path.unlink()
        log.error("%s; its weights (%s) were deleted to keep the disk usable (%s free); the report is kept at %s",
                  why, human_bytes(size), human_bytes(free), target)
    else:
        log.error("%s; the merged model (%s) is kept for inspection at %s; delete it when done", why,
                  human_bytes(size), target)
    os.replace(tmp, target)
    return target


def fsync_files(folder: Path, names: list[str]) -> None:
    """Flush the named files (the shards were flushed as they were written) and then the folder's entries."""
    for name in names:
        fd = os.open(folder / name, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
