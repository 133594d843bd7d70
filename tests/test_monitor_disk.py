"""scripts/monitor_disk.py on a real tmpfs filled to known percentages; signals and the parent-pid watch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from tmpfs_util import fill_file, used_pct

from cogumi.core.paths import SCRIPTS_DIR

MONITOR = SCRIPTS_DIR / "monitor_disk.py"
SIZE = 4 * 1024 * 1024  # 1024 pages of 4 KiB: percentages land exactly on page multiples


@pytest.fixture()
def fs(tmpfs):
    return tmpfs(SIZE)


def monitor(*args, timeout=30):
    # Standard library only: run it with no PYTHONPATH, from another folder, as a copied file would be.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, str(MONITOR), *args], capture_output=True, text=True, timeout=timeout,
                          cwd="/", env=env)


def fill_to(where: Path, pct: float) -> None:
    fill_file(where / f"fill-{pct}", int(SIZE * pct / 100))
    assert abs(used_pct(where) - pct) < 0.5


@pytest.mark.parametrize("pct,level,code", [(0, "ok", 0), (65, "warn", 10), (85, "alert", 20),
                                            (95, "critical", 30)])
def test_levels_and_exit_codes_at_each_threshold(fs, pct, level, code):
    if pct:
        fill_to(fs, pct)
    result = monitor("--path", str(fs), "--once")
    assert result.returncode == code, result.stdout + result.stderr
    line = result.stdout.strip()
    assert len(line.splitlines()) == 1 and level.upper() in line and f"used {used_pct(fs):.1f}%" in line
    if level != "ok":
        assert "->" in line  # says what to do


def test_threshold_is_inclusive_and_configurable(fs):
    fill_to(fs, 50)  # exactly 512 of 1024 pages
    assert used_pct(fs) == 50.0
    assert monitor("--path", str(fs), "--once", "--warn", "50").returncode == 10
    assert monitor("--path", str(fs), "--once", "--warn", "50.5").returncode == 0
    assert monitor("--path", str(fs), "--once", "--warn", "10", "--alert", "20", "--critical", "50").returncode == 30
    bad = monitor("--once", "--warn", "90", "--alert", "80")
    assert bad.returncode == 2 and "warn <= alert" in bad.stderr


def test_json_fields_and_checkpoint_count_alert(fs):
    run = fs / "phase1a"
    for step in (2000, 4000, 6000):
        (run / f"checkpoint-{step}").mkdir(parents=True)
    (run / "checkpoint-8000.stale-20260101-000000").mkdir()  # moved aside: not counted
    fill_to(fs, 10)
    result = monitor("--path", str(fs), "--once", "--json", "--checkpoints", str(run), "--keep", "3")
    row = json.loads(result.stdout)
    assert result.returncode == 0
    assert {"time", "path", "used_pct", "free_bytes", "level", "checkpoints", "keep"} <= set(row)
    assert row["path"] == str(fs) and row["level"] == "ok" and row["checkpoints"] == 3 and row["keep"] == 3
    assert abs(row["used_pct"] - 10) < 0.5 and row["free_bytes"] == os.statvfs(fs).f_bavail * os.statvfs(fs).f_frsize
    # More checkpoints than keep is an alert by itself, at 10 % used: retention is not working.
    result = monitor("--path", str(fs), "--once", "--json", "--checkpoints", str(run), "--keep", "2")
    row = json.loads(result.stdout)
    assert result.returncode == 20 and row["level"] == "alert" and "retention" in row["reasons"][0]


def test_missing_path_measures_the_nearest_parent(fs):
    result = monitor("--path", str(fs / "not" / "yet"), "--once", "--json")
    row = json.loads(result.stdout)
    assert result.returncode == 0 and row["measured_at"] == str(fs)


def start_watching(*extra):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.Popen([sys.executable, str(MONITOR), "--path", "/", "--interval", "600", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline()  # the first reading is out: handlers are installed
    return proc


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stops_cleanly_on_sigterm_and_sigint(sig):
    proc = start_watching()
    proc.send_signal(sig)
    assert proc.wait(timeout=5) == 0
    assert "Traceback" not in proc.stderr.read()


def gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(") ")[1].startswith("Z")  # a zombie nobody reaped has exited too
    except FileNotFoundError:
        return True


def wait_gone(pid: int, timeout: float = 5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if gone(pid):
            return True
        time.sleep(0.1)
    return False


def test_exits_when_its_parent_is_killed_minus_9():
    # A stand-in trainer starts the sidecar with --parent-pid of itself, then is killed -9: no finally runs.
    code = (f"import os, subprocess, sys, time\n"
            f"p = subprocess.Popen([sys.executable, {str(MONITOR)!r}, '--path', '/', '--interval', '600',\n"
            f"                      '--parent-pid', str(os.getpid())], stdout=subprocess.DEVNULL)\n"
            f"print(p.pid, flush=True)\n"
            f"time.sleep(60)\n")
    parent = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    time.sleep(0.5)
    assert not gone(child)
    parent.kill()
    parent.wait()
    assert wait_gone(child), "the monitor outlived its parent"


def test_exits_when_an_unrelated_parent_pid_dies():
    sleeper = subprocess.Popen(["sleep", "60"])
    proc = start_watching("--parent-pid", str(sleeper.pid))
    time.sleep(0.3)
    assert proc.poll() is None
    sleeper.kill()
    sleeper.wait()
    assert proc.wait(timeout=5) == 0
