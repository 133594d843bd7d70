"""Checkpoints that cannot fill the disk or be half-written (ISSUES_LOG.md: 'Disk Space Exhaustion at Step 9000').

A checkpoint is `run_dir/checkpoint-<step>/` and counts only when its COMPLETE marker is there. `save_checkpoint`
is the one way to write one:

1. room check first: free space must hold one more checkpoint (the measured size of the newest complete one, else
   the caller's estimate) plus a margin, otherwise DiskStop before a byte is written;
2. the caller's `write(folder)` fills `run_dir/.tmp-checkpoint-<step>/`; any failure removes that folder, and a
   failure caused by a full disk becomes DiskStop (exit code 3, resumable from the previous checkpoint);
3. every file is fsynced, the COMPLETE marker is written last, then the folder is renamed to its final name;
4. retention is verified, not trusted: the newest `keep_last` complete checkpoints by step NUMBER stay, older ones
   are deleted (a failed deletion raises), a stale higher-numbered checkpoint from an old run and incomplete
   folders are moved aside (never deleted), and the folder is listed again to prove at most `keep_last` remain.

The origin incident had `save_total_limit=3` silently keeping nine checkpoints until safetensors died mid-write with
ENOSPC. Here a deletion that fails stops the run with a message, and the run stops cleanly a save early instead.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

from cogumi.core.errors import EXIT_DISK_STOP, UserError
from cogumi.core.fsutil import dir_size, free_bytes, move_aside

log = logging.getLogger(__name__)

COMPLETE = "COMPLETE"
PREFIX = "checkpoint-"
TMP_PREFIX = ".tmp-checkpoint-"  # only this module creates these: leftovers of a killed write, safe to delete
TRASH_PREFIX = ".deleting-checkpoint-"  # a retired checkpoint renamed before rmtree, so it never looks complete
_NAME = re.compile(r"^checkpoint-(\d+)$")
# Names that fsutil.move_aside gives: checkpoint-<n>.<label>-<stamp>; listed as things a user may free.
_ASIDE = re.compile(r"^checkpoint-\d+\.(stale|incomplete|old)-")


class DiskStop(UserError):
    """Not enough room to save safely: training stops here, resumable from the last complete checkpoint."""

    exit_code = EXIT_DISK_STOP


class RetentionError(UserError):
    """Retention could not be enforced (a deletion failed, or too many checkpoints remain).

    The checkpoint just written is complete, so the run is resumable: same exit code as DiskStop.
    """

    exit_code = EXIT_DISK_STOP


def human_bytes(n: float | None) -> str:
    """Decimal units, as `df -H` and the hub show them: 2.10 GB."""
    if n is None:
        return "unknown"
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(value) < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.2f} {unit}"
        value /= 1000
    return f"{value:.2f} TB"  # unreachable; keeps type checkers calm


def checkpoint_path(run_dir: Path, step: int) -> Path:
    return Path(run_dir) / f"{PREFIX}{step}"


def _step_folders(run_dir: Path) -> list[tuple[int, Path]]:
    """Every `checkpoint-<n>` folder, complete or not, sorted by the step number."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = []
    for entry in run_dir.iterdir():
        match = _NAME.match(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            found.append((int(match.group(1)), entry))
    return sorted(found, key=lambda item: item[0])


def is_complete(folder: Path) -> bool:
    return (Path(folder) / COMPLETE).is_file()


def require_saved_files(checkpoint: Path, names: tuple[str, ...]) -> None:
    """COMPLETE vouches for a whole save; a checkpoint marked COMPLETE but missing a file resume reads was damaged
    afterwards (a hand edit, a partial copy): a one-screen error naming the file, not a traceback (ISSUES_LOG B49)."""
    for name in names:
        if not (Path(checkpoint) / name).is_file():
            raise UserError(f"{Path(checkpoint).name} is marked {COMPLETE} but has no {name}: it was damaged after it "
                            "was saved", where=str(Path(checkpoint) / name),
                            fix=f"move {checkpoint} out of the run folder to resume from the checkpoint before it, "
                                "or RESUME=0 to start fresh (the old run is moved aside, nothing is deleted)")


def list_complete(run_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first, ordered by step number (checkpoint-9000 before checkpoint-10000)."""
    return [(step, path) for step, path in _step_folders(run_dir) if is_complete(path)]


def latest_complete(run_dir: Path) -> Path | None:
    complete = list_complete(run_dir)
    return complete[-1][1] if complete else None


def resume_note(run_dir: Path, *, fresh: bool) -> str:
    """Where the same command starts again, said at the moment of the interrupt."""
    if fresh:
        return "with RESUME=0, training starts again from step 0"
    latest = latest_complete(run_dir)
    if latest is None:
        return "no checkpoint was saved yet: training starts again from step 0"
    return f"training resumes from {latest.name}, the newest complete checkpoint"


def measured_checkpoint_size(run_dir: Path) -> int | None:
    """Bytes on disk of the newest complete checkpoint (what the next one will need), or None before the first."""
    latest = latest_complete(run_dir)
    return dir_size(latest) if latest is not None else None


def freeable(run_dir: Path) -> list[tuple[Path, int]]:
    """Folders in run_dir that this module moved aside or could not finish deleting, with their sizes.

    They are never deleted automatically (a stale checkpoint may be someone's old run), so a "no room" message
    names them as the first thing to free.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    out = []
    for entry in sorted(run_dir.iterdir()):
        if entry.is_dir() and (_ASIDE.match(entry.name) or entry.name.startswith(TRASH_PREFIX)):
            out.append((entry, dir_size(entry)))
    return out


def what_to_free(run_dir: Path, short_by: int) -> str:
    """One line for a DiskStop/preflight `fix`: the moved-aside folders first, then the general options."""
    items = freeable(run_dir)
    text = f"free at least {human_bytes(short_by)} on that filesystem"
    if items:
        listed = ", ".join(f"{path} ({human_bytes(size)})" for path, size in items[:5])
        more = f" and {len(items) - 5} more" if len(items) > 5 else ""
        text += f", e.g. these moved-aside folders: {listed}{more}"
    return (text + "; or lower checkpoints.keep_last, or set output_root to a larger volume "
            "(see docs/TROUBLESHOOTING.md, 'Disk sizing'); then run `make train` again: it resumes")


def _room_check(run_dir: Path, step: int, need_one: int, margin_bytes: int, source: str) -> None:
    free = free_bytes(run_dir)
    need = need_one + margin_bytes
    if free >= need:
        return
    latest = latest_complete(run_dir)
    resume = f"resumable from {latest.name}" if latest else "no complete checkpoint yet"
    raise DiskStop(
        f"stopped before saving step {step}: {human_bytes(free)} free, a checkpoint needs "
        f"{human_bytes(need_one)} ({source}) + {human_bytes(margin_bytes)} margin; nothing was written ({resume})",
        where=str(Path(run_dir).absolute()),
        fix=what_to_free(run_dir, need - free),
    )


def looks_like_disk_full(err: BaseException, free_now: int, margin_bytes: int) -> bool:
    """Was a failed write caused by a full disk?

    errno says so for OSError; safetensors wraps it as 'os error 28' text; torch.save on a full disk raises only
    'unexpected pos ...' (no errno), so the last test is physical: the margin we checked before writing is gone.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(seen)
        if "No space left on device" in text or "os error 28" in text or "StorageFull" in text:
            return True
        seen = seen.__cause__ or seen.__context__
    return free_now < max(margin_bytes, 1 << 20)


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder to disk, so COMPLETE never lands before the data it vouches for."""
    for root, _dirs, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_DELETE_FIX = ("check permissions and attributes (`lsattr -d`, `chattr -i`), open handles (`lsof +D`) and mounts "
               "inside it; remove it by hand, then run `make train` again: it resumes")


def _remove_tree(path: Path, why: str) -> None:
    """rmtree that reports: a deletion that fails is an error, never a silent pass (no ignore_errors)."""
    try:
        shutil.rmtree(path)
    except OSError as err:
        raise RetentionError(
            f"could not delete {why} {path}: {err.strerror or err} ({getattr(err, 'filename', None) or path})",
            where=str(path),
            fix=_DELETE_FIX,
        ) from err


def _retire(folder: Path, trash: Path) -> None:
    """Delete an old checkpoint and prove it is gone.

    Renamed first (atomic), so a deletion that fails half-way never leaves a broken folder that still looks
    complete; then checked, because the origin incident's deletion 'succeeded' and left every checkpoint behind.
    """
    try:
        os.rename(folder, trash)
    except OSError as err:
        raise RetentionError(f"could not retire the old checkpoint {folder}: {err.strerror or err}",
                             where=str(folder), fix=_DELETE_FIX) from err
    _remove_tree(trash, f"the old checkpoint {folder.name}, renamed to")
    if trash.exists():
        raise RetentionError(f"deleting the old checkpoint {folder.name} reported success but {trash} is still there",
                             where=str(trash), fix=_DELETE_FIX)


def _clean_scratch(run_dir: Path) -> None:
    """Delete this module's own leftovers: temp folders of a killed write and retired checkpoints not yet gone."""
    for entry in sorted(Path(run_dir).iterdir()):
        if entry.is_dir() and not entry.is_symlink():
            if entry.name.startswith(TMP_PREFIX):
                log.warning("removing %s left by an interrupted save (it never reached its final name)", entry.name)
                _remove_tree(entry, "the unfinished temporary checkpoint")
            elif entry.name.startswith(TRASH_PREFIX):
                _remove_tree(entry, "the retired checkpoint")


def save_checkpoint(run_dir: Path, step: int, write: Callable[[Path], None], *, keep_last: int,
                    margin_bytes: int, expected_bytes: int | None) -> Path:
    """Write checkpoint-<step> safely and enforce retention; returns its final path.

    `write(folder)` must put everything needed to resume into `folder` (which exists and is empty).
    Raises DiskStop (nothing left behind) when there is no room before or during the write, RetentionError when
    retention cannot be enforced afterwards (the new checkpoint is complete and kept).
    """
    if keep_last < 1:
        raise ValueError("keep_last must be at least 1: the checkpoint just written is always kept")
    run_dir = Path(run_dir)
    if run_dir.is_dir():
        _clean_scratch(run_dir)  # before measuring: a killed write's leftovers are space we can reclaim

    measured = measured_checkpoint_size(run_dir)
    if measured is not None:
        need_one, source = measured, f"measured size of {latest_complete(run_dir).name}"
    else:
        need_one, source = int(expected_bytes or 0), "estimated" if expected_bytes else "no estimate given"
    _room_check(run_dir, step, need_one, margin_bytes, source)

    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f"{TMP_PREFIX}{step}"
    try:
        tmp.mkdir()
        write(tmp)
        _fsync_tree(tmp)
        size = dir_size(tmp)
        marker = {"step": step, "bytes": size, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        with open(tmp / COMPLETE, "w", encoding="utf-8") as fh:
            fh.write(json.dumps(marker) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        _fsync_dir(tmp)
    except BaseException as err:
        free_now = free_bytes(run_dir)  # before cleanup, while the failed write still occupies the disk
        if tmp.exists():
            _remove_tree(tmp, "the failed temporary checkpoint")
        if isinstance(err, Exception) and looks_like_disk_full(err, free_now, margin_bytes):
            latest = latest_complete(run_dir)
            resume = f"resumable from {latest.name}" if latest else "no complete checkpoint yet"
            raise DiskStop(
                f"the disk filled while saving step {step} ({type(err).__name__}: {str(err)[:200]}); the partial "
                f"write was removed, nothing is left under {PREFIX}{step} ({resume})",
                where=str(run_dir.absolute()),
                # The write proved the checkpoint is bigger than what was free: ask for at least one margin more.
                fix=what_to_free(run_dir, max(need_one + margin_bytes - free_bytes(run_dir), margin_bytes)),
            ) from err
        raise

    final = checkpoint_path(run_dir, step)
    if final.exists():
        # Same step from an earlier run (e.g. resumed from an older checkpoint): keep it, out of the way.
        aside = move_aside(final, "stale" if is_complete(final) else "incomplete")
        log.warning("moved an older %s aside to %s", final.name, aside.name)
    os.rename(tmp, final)
    _fsync_dir(run_dir)
    log.info("saved %s (%s)", final.name, human_bytes(size))
    enforce_retention(run_dir, keep_last=keep_last, current_step=step)
    return final


def enforce_retention(run_dir: Path, *, keep_last: int, current_step: int) -> list[tuple[int, Path]]:
    """Keep exactly the newest `keep_last` complete checkpoints up to `current_step`, then verify by listing again.

    Returns the checkpoints that remain. Higher-numbered checkpoints (a stale old run) and incomplete folders are
    moved aside, never deleted: they may be someone's work, and deleting by the wrong rule is how the one just
    written could go.
    """
    run_dir = Path(run_dir)
    for step, folder in _step_folders(run_dir):
        if not is_complete(folder):
            aside = move_aside(folder, "incomplete")
            log.warning("moved %s aside to %s: it has no %s marker", folder.name, aside.name, COMPLETE)
        elif step > current_step:
            aside = move_aside(folder, "stale")
            log.warning("moved %s aside to %s: it is newer than step %d, so it belongs to an older run",
                        folder.name, aside.name, current_step)

    complete = list_complete(run_dir)
    for step, folder in complete[:-keep_last]:  # oldest first; empty when keep_last or fewer exist
        _retire(folder, run_dir / f"{TRASH_PREFIX}{step}")
        log.info("deleted %s (keep_last=%d)", folder.name, keep_last)

    remaining = list_complete(run_dir)
    if len(remaining) > keep_last:
        raise RetentionError(
            f"{len(remaining)} complete checkpoints remain in {run_dir}, keep_last is {keep_last}: "
            f"{', '.join(p.name for _, p in remaining)}",
            where=str(run_dir), fix="remove the extra folders by hand, then run `make train` again: it resumes")
    if not remaining or remaining[-1][0] != current_step:
        raise RetentionError(f"checkpoint-{current_step} is missing after retention in {run_dir}",
                             where=str(run_dir), fix="report this as a bug; resume from the newest complete one")
    return remaining
