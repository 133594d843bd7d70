"""A merge killed with -9 leaves its whole temporary output (~16 GB for the 8B); the next merge of the same run
removes it, says how much it freed, and keeps a folder whose merge is still alive (counted in the disk refusal)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
from merge_helpers import job, make_adapter
from tmpfs_util import fill_file

from cogumi.core.errors import UserError
from cogumi.merge.stream import run_merge

# A pid above the kernel's maximum is never a live process: the "dead merge" needs no race with pid reuse.
DEAD_PID = int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def model_bytes(base: Path) -> int:
    return sum(p.stat().st_size for p in base.iterdir() if p.is_file())


def leftover(out_dir: Path, pid: int, size: int) -> Path:
    folder = out_dir.with_name(f".{out_dir.name}.tmp-{pid}")
    folder.mkdir(parents=True)
    fill_file(folder / "model-00001-of-00002.safetensors", size)
    return folder


def test_a_dead_merges_temporary_folder_is_reclaimed_so_the_merge_fits(tiny_sharded_bf16_dir, tmp_path, tmpfs,
                                                                        caplog):
    adapter = make_adapter(tiny_sharded_bf16_dir, tmp_path / "adapter")
    size = model_bytes(tiny_sharded_bf16_dir)
    fs = tmpfs(int(2.2 * size))  # room for one merge and a bit, not for a merge beside a dead one's output
    out_dir = fs / "merged"
    dead = leftover(out_dir, DEAD_PID, int(1.5 * size))
    report = run_merge(job(tiny_sharded_bf16_dir, adapter, out_dir))  # the old code: "not enough disk"
    assert report["passed"] and (out_dir / "manifest.json").is_file()
    assert not dead.exists()
    assert f"pid {DEAD_PID} is gone" in caplog.text and "freed" in caplog.text


def test_a_live_merges_temporary_folder_is_kept_and_named_in_the_disk_refusal(tiny_sharded_bf16_dir, tmp_path,
                                                                               tmpfs):
    adapter = make_adapter(tiny_sharded_bf16_dir, tmp_path / "adapter")
    size = model_bytes(tiny_sharded_bf16_dir)
    fs = tmpfs(int(2.2 * size))
    out_dir = fs / "merged"
    owner = subprocess.Popen(["sleep", "60"])
    try:
        live = leftover(out_dir, owner.pid, int(1.5 * size))
        with pytest.raises(UserError, match="not enough disk") as err:
            run_merge(job(tiny_sharded_bf16_dir, adapter, out_dir))
        assert live.exists() and live.name in err.value.what and "live merges" in err.value.what
    finally:
        owner.kill()
        owner.wait()
