"""Real small filesystems for the disk tests: a tmpfs of a few MB, mounted for one test (needs root, as CI has)."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

PAGE = os.sysconf("SC_PAGE_SIZE")


def mount_tmpfs(where: Path, size_bytes: int) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (root needed): {result.stderr.strip()}")
    return where


def unmount(where: Path) -> None:
    # Immutable files (the failed-deletion test) do not block an unmount; clear them anyway for tidy listings.
    subprocess.run(["chattr", "-R", "-i", str(where)], capture_output=True)
    if subprocess.run(["umount", str(where)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(where)], check=True)


def fill_file(path: Path, size: int) -> Path:
    with open(path, "wb") as fh:
        fh.write(b"\0" * size)
    return path


def used_pct(path: Path) -> float:
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    return 100.0 * used / (used + st.f_bavail * st.f_frsize)
