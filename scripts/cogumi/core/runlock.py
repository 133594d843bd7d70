"""One run at a time: an advisory lock per run, held by the process that trains, merges or validates it.

The lock is `fcntl.flock` on `<output_root>/.<name>.lock`. The kernel drops it when the process ends in any way
(kill -9 included), so a crash never leaves a stale lock that blocks the rerun. The file holds the holder's pid so
the refusal can name it, and is removed on release. Two runs of the same folder used to both proceed: the second
moved the first's checkpoints aside and every log row was written twice (ISSUES_LOG B23).
"""

from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from cogumi.core.errors import UserError


def lock_path(output_root: Path, name: str) -> Path:
    return Path(output_root) / f".{name}.lock"


def _holder(path: Path) -> str:
    try:
        pid = path.read_text(encoding="ascii").strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process (pid not yet written)"


def acquire(path: Path, what: str) -> int:
    """Open and lock `path` without waiting; returns the file descriptor. A held lock is a UserError (exit 2)."""
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise UserError(f"cannot write in the output folder {path.parent}: {err.strerror or err}",
                            where=str(path.parent),
                            fix="make it writable (mount options, permissions), or set output_root to a "
                                "writable folder") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            raise UserError(f"{what} is already running ({_holder(path)})", where=str(path),
                            fix="wait for it to finish, or stop it (Ctrl-C; it resumes later); "
                                "a lock left by a killed process is released by the kernel") from None
        # The holder before us may have removed the file between our open and our lock: then we locked a file
        # nobody else can see. Retry on the path's current file.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
    except OSError:
        pass  # a full disk must not stop the lock itself; the refusal then says "pid not yet written"
    return fd


def release(path: Path, fd: int) -> None:
    # Unlink while still holding the lock, so no waiter can lock the old file after us (see acquire's retry).
    try:
        path.unlink()
    except FileNotFoundError:
        pass
    os.close(fd)


@contextmanager
def hold(output_root: Path, name: str, what: str):
    """`with hold(root, name, "training of phase1a"):` refuses (exit 2) while another process holds it."""
    path = lock_path(output_root, name)
    fd = acquire(path, what)
    try:
        yield path
    finally:
        release(path, fd)


def hold_run(output_root: Path, name: str):
    """The lock of the run `name`, shared by its training, merge and validation: one of them at a time (a merge
    replaces the model a validation reads; training and merge read and write the same run folder)."""
    return hold(output_root, name, f"training, merge or validation of {name}")
