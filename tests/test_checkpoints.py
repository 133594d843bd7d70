"""Checkpoint mechanics (ISSUES_LOG O3).

Real filesystems only: the disk-full cases run on a tmpfs of a few MB, the failed deletion on an immutable file.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess

import pytest
from tmpfs_util import fill_file

from cogumi.core.errors import EXIT_DISK_STOP
from cogumi.train.checkpoints import (
    COMPLETE,
    DiskStop,
    RetentionError,
    checkpoint_path,
    latest_complete,
    list_complete,
    measured_checkpoint_size,
    save_checkpoint,
)

KB = 1024


def writer(size: int = 10 * KB, calls: list | None = None):
    def _write(folder):
        if calls is not None:
            calls.append(folder)
        fill_file(folder / "adapter.bin", size)
        (folder / "state.json").write_text("{}")
    return _write


def make_complete(run_dir, step, size=KB):
    folder = checkpoint_path(run_dir, step)
    folder.mkdir(parents=True)
    fill_file(folder / "adapter.bin", size)
    (folder / COMPLETE).write_text(json.dumps({"step": step}))
    return folder


def save(run_dir, step, keep_last=2, write=None, margin=0, expected=None):
    return save_checkpoint(run_dir, step, write or writer(), keep_last=keep_last, margin_bytes=margin,
                           expected_bytes=expected)


def names(run_dir):
    return sorted(p.name for p in run_dir.iterdir())


def test_ordering_is_by_step_number_not_string_or_mtime(tmp_path):
    run = tmp_path / "run"
    for step in (9000, 10000, 500):
        make_complete(run, step)
    os.utime(run / "checkpoint-10000", (1, 1))  # the newest step has the oldest mtime
    (run / "checkpoint-20000").mkdir()  # no COMPLETE: never listed, never resumed from
    (run / "checkpoint-abc").mkdir()
    make_complete(run, 7).rename(run / "checkpoint-7.stale-20260101-000000")
    assert [s for s, _ in list_complete(run)] == [500, 9000, 10000]
    assert latest_complete(run) == run / "checkpoint-10000"
    assert latest_complete(tmp_path / "missing") is None
    assert measured_checkpoint_size(tmp_path / "missing") is None


def test_save_marks_complete_last_and_keeps_newest_by_number(tmp_path):
    run = tmp_path / "run"
    save(run, 9000, keep_last=1)
    final = save(run, 10000, keep_last=1)  # string order would call 9000 the newest and delete 10000
    assert final == run / "checkpoint-10000"
    assert names(run) == ["checkpoint-10000"]
    marker = json.loads((final / COMPLETE).read_text())
    assert marker["step"] == 10000 and marker["bytes"] >= 10 * KB and "time" in marker
    for step in (11000, 12000, 13000):
        save(run, step, keep_last=2)
        assert [s for s, _ in list_complete(run)] == [step - 1000, step]
    assert names(run) == ["checkpoint-12000", "checkpoint-13000"]
    # Measured = what the writer wrote + the small marker itself.
    assert marker["bytes"] < measured_checkpoint_size(run) < marker["bytes"] + 200


def test_stale_higher_numbered_and_incomplete_are_moved_aside_never_the_new_one(tmp_path):
    run = tmp_path / "run"
    make_complete(run, 50000, size=3 * KB)  # an old run that got further
    (run / "checkpoint-100").mkdir()  # a half-written folder from the old crash (no COMPLETE)
    (run / "checkpoint-100" / "adapter.bin").write_bytes(b"partial")
    (run / ".tmp-checkpoint-150").mkdir()  # a killed save of ours: scratch, removed
    final = save(run, 200, keep_last=2)
    assert [p for _, p in list_complete(run)] == [final]
    stale = [p for p in run.iterdir() if p.name.startswith("checkpoint-50000.stale-")]
    incomplete = [p for p in run.iterdir() if p.name.startswith("checkpoint-100.incomplete-")]
    assert len(stale) == 1 and (stale[0] / "adapter.bin").stat().st_size == 3 * KB  # moved, not deleted
    assert len(incomplete) == 1 and (incomplete[0] / "adapter.bin").read_bytes() == b"partial"
    assert not (run / ".tmp-checkpoint-150").exists()


def test_same_step_from_an_older_run_is_moved_aside(tmp_path):
    run = tmp_path / "run"
    old = make_complete(run, 300, size=5)
    (old / "marker-of-old-run").write_text("old")
    final = save(run, 300, keep_last=2)
    assert not (final / "marker-of-old-run").exists()
    assert any(p.name.startswith("checkpoint-300.stale-") for p in run.iterdir())


def test_failed_deletion_is_an_error_not_a_silent_pass(tmpfs):
    fs = tmpfs(4 * 1024 * KB)
    run = fs / "run"
    old = make_complete(run, 1)
    subprocess.run(["chattr", "+i", str(old / "adapter.bin")], check=True)  # even root cannot unlink it
    with pytest.raises(RetentionError) as info:
        save(run, 2, keep_last=1)
    assert info.value.exit_code == EXIT_DISK_STOP
    assert "could not delete" in info.value.what and "adapter.bin" in info.value.what
    assert "chattr -i" in info.value.fix
    # The new checkpoint is complete and is what a resume picks; the failed one is not listed as complete.
    assert [s for s, _ in list_complete(run)] == [2]
    # The next save refuses too, until someone fixes it: no silent accumulation.
    with pytest.raises(RetentionError):
        save(run, 3, keep_last=1)
    subprocess.run(["chattr", "-R", "-i", str(run)], check=True)
    save(run, 3, keep_last=1)
    assert names(run) == ["checkpoint-3"]


def test_deletion_that_reports_success_but_leaves_files_is_caught(tmp_path, monkeypatch):
    # The incident: save_total_limit "deleted" and every checkpoint stayed. Simulate a no-op delete.
    import cogumi.train.checkpoints as ck

    run = tmp_path / "run"
    save(run, 1, keep_last=1)
    monkeypatch.setattr(ck.shutil, "rmtree", lambda path: None)
    with pytest.raises(RetentionError, match="still there"):
        save(run, 2, keep_last=1)


def test_disk_stop_before_writing_when_no_room(tmpfs):
    fs = tmpfs(4 * 1024 * KB)
    run = fs / "run"
    save(run, 1, write=writer(1500 * KB), keep_last=2)  # measured size ~1.5 MB
    fill_file(fs / "other-data.bin", 1800 * KB)  # ~0.8 MB left: not enough for one more
    calls = []
    with pytest.raises(DiskStop) as info:
        # A tiny estimate must not win over the measured size.
        save(run, 2, write=writer(1500 * KB, calls), keep_last=2, expected=1)
    assert calls == []  # nothing written
    assert names(run) == ["checkpoint-1"]
    assert info.value.exit_code == EXIT_DISK_STOP
    assert "nothing was written" in info.value.what and "checkpoint-1" in info.value.what
    assert "free at least" in info.value.fix and "make train" in info.value.fix
    # After freeing space the same save goes through.
    (fs / "other-data.bin").unlink()
    save(run, 2, write=writer(1500 * KB), keep_last=2)
    assert [s for s, _ in list_complete(run)] == [1, 2]


def test_disk_stop_uses_estimate_before_the_first_checkpoint_and_the_margin(tmpfs):
    fs = tmpfs(2 * 1024 * KB)
    run = fs / "run"
    with pytest.raises(DiskStop, match="estimated"):
        save(run, 1, expected=3 * 1024 * KB)
    with pytest.raises(DiskStop, match="margin"):
        save(run, 1, expected=KB, margin=3 * 1024 * KB)
    assert not run.exists() or names(run) == []


def test_enospc_mid_write_leaves_no_final_named_folder(tmpfs):
    fs = tmpfs(4 * 1024 * KB)
    run = fs / "run"
    first = save(run, 1, write=writer(100 * KB))
    with pytest.raises(DiskStop, match="disk filled while saving step 2") as info:
        save(run, 2, write=writer(8 * 1024 * KB), expected=KB)  # the estimate was wrong: 8 MB on a 4 MB disk
    assert isinstance(info.value.__cause__, OSError) and info.value.__cause__.errno == errno.ENOSPC
    assert names(run) == ["checkpoint-1"]  # no checkpoint-2, no .tmp-checkpoint-2
    assert latest_complete(run) == first
    assert os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize > 3 * 1024 * KB  # the partial write was removed


def test_torch_save_disk_full_without_errno_is_a_disk_stop(tmpfs):
    # torch.save on a full disk raises RuntimeError('unexpected pos ...') with no errno: caught physically.
    torch = pytest.importorskip("torch")
    fs = tmpfs(1024 * KB)
    run = fs / "run"

    def write(folder):
        torch.save({"exp_avg": torch.zeros(512 * 1024)}, folder / "optimizer.pt")  # 2 MB on a 1 MB disk

    with pytest.raises(DiskStop):
        save(run, 5, write=write, expected=KB)
    assert names(run) == []


def test_other_write_errors_propagate_and_leave_nothing(tmp_path):
    run = tmp_path / "run"

    def broken(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise ValueError("a bug in the writer")

    with pytest.raises(ValueError, match="a bug in the writer"):
        save(run, 7, write=broken)
    assert names(run) == []

    def interrupted(folder):
        (folder / "half.bin").write_bytes(b"x")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        save(run, 7, write=interrupted)
    assert names(run) == []


@pytest.mark.slow
@pytest.mark.parametrize("save_steps", [100000, 1])
def test_the_interrupt_line_says_where_the_rerun_starts(tmp_path, tiny_model_dir, save_steps):
    """Ctrl-C (here SIGTERM, the same path) once training runs: with no checkpoint yet the line must not promise a
    resume from one (ISSUES_LOG B52). No timing luck: with save_steps 100000 no checkpoint can exist, with 1 the
    signal waits for the first one."""
    import signal
    import sys
    import time

    import yaml

    from cogumi.core.paths import SCRIPTS_DIR

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}?", "response": f"{2 * i}"}) + "\n" for i in range(8)))
    config = tmp_path / "interrupted.yaml"
    config.write_text(yaml.safe_dump({
        "name": "interrupted", "base_model": str(tiny_model_dir), "output_root": str(tmp_path / "out"),
        "data": {"train_path": str(data), "max_seq_len": 32},
        "lora": {"r": 2, "alpha": 4, "target_modules": ["q_proj"]},
        "train": {"max_steps": 1000000, "micro_batch_size": 2, "grad_accum": 1, "log_every": 1},
        "checkpoints": {"save_steps": save_steps, "keep_last": 2}, "disk": {"monitor": False, "margin_mb": 1}}))
    run_dir = tmp_path / "out" / "interrupted"
    log = tmp_path / "stderr.txt"  # a file, not a pipe: a full pipe would stall the run before its first checkpoint
    with open(log, "w") as stderr:
        proc = subprocess.Popen([sys.executable, str(SCRIPTS_DIR / "train_phase1a_fullprecision.py"), "--phase",
                                 str(config)], env={**os.environ, "PYTHONPATH": str(SCRIPTS_DIR)}, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=stderr)
    deadline = time.monotonic() + 240
    started = (lambda: list_complete(run_dir)) if save_steps == 1 else (lambda: (run_dir / "train_log.jsonl").exists()
                                                                      and (run_dir / "train_log.jsonl").stat().st_size)
    while time.monotonic() < deadline and proc.poll() is None and not started():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=120)
    err = log.read_text()
    assert proc.returncode == 130, err[-3000:]
    line = next(line for line in err.splitlines() if line.startswith("Interrupted:"))
    if save_steps == 1:
        assert "training resumes from checkpoint-" in line, line
    else:
        assert "no checkpoint was saved yet: training starts again from step 0" in line, line
        assert not list_complete(run_dir)
