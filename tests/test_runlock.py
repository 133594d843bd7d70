"""One run at a time (cogumi.core.runlock) and one switch parser (cogumi.core.switches), with real processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cogumi.core import runlock
from cogumi.core.errors import UserError
from cogumi.core.paths import SCRIPTS_DIR
from cogumi.core.switches import parse_bool, switch

HOLD = """
import sys, time
sys.path.insert(0, {scripts!r})
from cogumi.core import runlock
with runlock.hold({root!r}, "phase1a", "training of phase1a"):
    print("held", flush=True)
    time.sleep(120)
"""


def holder(root: Path) -> subprocess.Popen:
    """Another process holding phase1a's lock, as a running `make train` does."""
    proc = subprocess.Popen([sys.executable, "-c", HOLD.format(scripts=str(SCRIPTS_DIR), root=str(root))],
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


@pytest.mark.parametrize("word, expected", [("1", True), ("on", True), ("Yes", True), ("TRUE", True),
                                            ("0", False), ("off", False), ("no", False), ("false", False),
                                            (True, True), (False, False)])
def test_every_switch_word_parses(word, expected):
    assert parse_bool(word, "FORCE", "test") is expected


def test_a_switch_that_is_not_a_switch_word_is_refused(monkeypatch):
    monkeypatch.setenv("FORCE", "maybe")
    with pytest.raises(UserError, match="'FORCE' is a switch, got 'maybe'"):
        switch("FORCE")
    monkeypatch.setenv("FORCE", "yes")
    assert switch("FORCE") is True


def test_second_holder_is_refused_naming_the_pid_and_kill_9_leaves_no_stale_lock(tmp_path):
    first = holder(tmp_path)
    try:
        with pytest.raises(UserError) as err:
            with runlock.hold(tmp_path, "phase1a", "training of phase1a"):
                pass
        assert f"pid {first.pid}" in err.value.what and "already running" in err.value.what
        with runlock.hold(tmp_path, "phase1b", "training of phase1b"):  # another run is not blocked
            pass
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert runlock.lock_path(tmp_path, "phase1a").exists()  # kill -9 ran no cleanup...
    with runlock.hold(tmp_path, "phase1a", "training of phase1a"):  # ...yet the kernel released the lock
        pass
    assert not runlock.lock_path(tmp_path, "phase1a").exists()  # a clean release removes the file


@pytest.mark.parametrize("script", ["train_phase1a_fullprecision.py", "merge_adapter_fullprecision.py", "benchmark.py"])
def test_train_merge_and_validate_of_a_running_run_exit_2(tmp_path, script, run_script):
    cfg = tmp_path / "phase1a.yaml"
    cfg.write_text(f"name: phase1a\noutput_root: {tmp_path}\nbase_model: {tmp_path / 'no-base'}\n")
    first = holder(tmp_path)
    try:
        started = time.monotonic()
        second = run_script(script, "--phase", str(cfg), timeout=300)
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert second.returncode == 2, second.stderr[-2000:]
    first_line = second.stderr.strip().splitlines()[0] if second.stderr.strip() else ""
    assert any(f"already running (pid {first.pid})" in line for line in second.stderr.splitlines()), second.stderr
    assert "ERROR" in second.stderr and time.monotonic() - started < 300, first_line
    assert sorted(p.name for p in tmp_path.iterdir()) == [".phase1a.lock", "phase1a.yaml"]  # nothing else made


def test_a_running_validation_holds_the_lock_of_its_run(tmp_path, monkeypatch, run_script):
    # While `make validate` runs, a merge of the same run (which would replace the model being read) is refused.
    import benchmark

    from cogumi.evaluate import validate

    cfg = tmp_path / "phase1a.yaml"
    cfg.write_text(f"name: phase1a\noutput_root: {tmp_path}\nbase_model: {tmp_path / 'no-base'}\n")
    merges = []

    def merge_meanwhile(*_args):
        merges.append(run_script("merge_adapter_fullprecision.py", "--phase", str(cfg), timeout=300))
        raise RuntimeError("validation stopped by the test")

    monkeypatch.setattr(validate, "build_plan", merge_meanwhile)
    with pytest.raises(RuntimeError, match="stopped by the test"):
        benchmark.main(["--phase", str(cfg)])
    (merge,) = merges
    assert merge.returncode == 2, merge.stderr[-2000:]
    assert f"training, merge or validation of phase1a is already running (pid {os.getpid()})" in merge.stderr
    assert not runlock.lock_path(tmp_path, "phase1a").exists()  # released on the way out, by an error too


def test_read_only_output_folder_is_one_clear_error(tmp_path, run_script):
    from tmpfs_util import mount_tmpfs, unmount

    out = mount_tmpfs(tmp_path / "ro", 1 << 20)
    try:
        if subprocess.run(["mount", "-o", "remount,ro", str(out)], capture_output=True).returncode != 0:
            pytest.skip("cannot remount read-only here")
        cfg = tmp_path / "phase1a.yaml"
        cfg.write_text(f"name: phase1a\noutput_root: {out}\nbase_model: {tmp_path / 'no-base'}\n")
        result = run_script("train_phase1a_fullprecision.py", "--phase", str(cfg), timeout=300)
    finally:
        unmount(out)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "ERROR: cannot write in the output folder" in result.stderr and "Traceback" not in result.stderr
