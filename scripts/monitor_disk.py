#!/usr/bin/env python3
"""Watch the disk that holds the checkpoints. One file, standard library only: copy it to any box and run it.

    python monitor_disk.py --path /data/checkpoints --checkpoints /data/checkpoints/phase1a --keep 2
    python monitor_disk.py --once --json          # one reading as JSON, exit code = its level

Each reading is one line: time, path, percent used, free space, level, and (with --checkpoints) how many
checkpoint-<step> folders exist against --keep. Levels, by percent of the filesystem used (as `df` counts it):

    ok        below --warn (60)
    warn      >= --warn       plan: a merged 8B model needs ~16 GB more at the end
    alert     >= --alert (80) act now: free space or lower keep_last; also when checkpoints > --keep
                              (retention is not working: the step-9000 incident)
    critical  >= --critical (90)  the next save may not fit; the trainer will stop cleanly at its next save

Exit codes: with --once, the level of the reading: ok 0, warn 10, alert 20, critical 30. Watching (no --once):
0 when stopped by SIGTERM/SIGINT (Ctrl-C) or when --parent-pid has gone. 2: bad arguments. 1: a crash.
(Not 1/2/3: those are Python's crash, argparse's usage error and the trainer's own disk-stop code.)

--parent-pid PID makes a sidecar exit by itself when the process that started it is gone, even after kill -9.
With --json, each line is one object: time, path, measured_at, used_pct, free_bytes, total_bytes, level, reasons,
checkpoints, keep, checkpoints_dir. Readings at warn or worse are also written to stderr when stderr is not the
same file as stdout, so a sidecar that logs to a file still shows them in the terminal.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import sys
import time

LEVELS = ("ok", "warn", "alert", "critical")
EXIT_CODES = {"ok": 0, "warn": 10, "alert": 20, "critical": 30}
ADVICE = {
    "ok": "",
    "warn": "plan space for the next checkpoints and the merged model",
    "alert": "free space now (old runs, moved-aside checkpoint-*.stale-* folders) or lower keep_last",
    "critical": "the next save may not fit: training will stop cleanly at its next save; free space",
}
CHECKPOINT_NAME = re.compile(r"^checkpoint-\d+$")
RECOUNT_DELAY_S = 1.0  # a save briefly shows keep+1 folders between its rename and retention
POLL_S = 0.5  # how often a sleeping monitor checks for a signal or a vanished parent

_stop_signal = None


def _on_signal(signum, _frame):
    global _stop_signal
    _stop_signal = signum


def existing(path: str) -> str:
    """The path itself, or its nearest existing parent: a run folder may not exist yet when watching starts."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return path


def usage(path: str) -> tuple[float, int, int]:
    """(percent used, free bytes, total bytes) as `df` reports them: root-reserved blocks count as used."""
    st = os.statvfs(path)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    free = st.f_bavail * st.f_frsize
    total = st.f_blocks * st.f_frsize
    pct = 100.0 * used / (used + free) if used + free else 0.0
    return pct, free, total


def count_checkpoints(folder: str | None) -> int | None:
    if not folder or not os.path.isdir(folder):
        return None
    return sum(1 for name in os.listdir(folder)
               if CHECKPOINT_NAME.match(name) and os.path.isdir(os.path.join(folder, name)))


def reading(args) -> dict:
    measured_at = existing(args.path)
    pct, free, total = usage(measured_at)
    level, reasons = "ok", []
    for name, threshold in (("critical", args.critical), ("alert", args.alert), ("warn", args.warn)):
        if pct >= threshold:
            level = name
            reasons.append(f"{pct:.1f}% used >= {name} {threshold:g}%")
            break
    count = count_checkpoints(args.checkpoints)
    if count is not None and args.keep is not None and count > args.keep:
        time.sleep(RECOUNT_DELAY_S)  # only a count that survives a save's rename-then-delete window is real
        count = count_checkpoints(args.checkpoints)
        if count is not None and count > args.keep:
            reasons.append(f"{count} checkpoints > keep {args.keep}: retention is not deleting old ones")
            level = max(level, "alert", key=LEVELS.index)
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "path": args.path,
        "measured_at": measured_at,
        "used_pct": round(pct, 2),
        "free_bytes": free,
        "total_bytes": total,
        "level": level,
        "reasons": reasons,
        "checkpoints": count,
        "keep": args.keep,
        "checkpoints_dir": args.checkpoints,
    }


def human_bytes(n: int) -> str:
    value = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"


def human_line(r: dict) -> str:
    where = r["path"] if os.path.exists(r["path"]) else f"{r['path']} (not there yet; measured at {r['measured_at']})"
    parts = [r["time"].replace("T", " ")[:19], where, f"used {r['used_pct']:.1f}%",
             f"free {human_bytes(r['free_bytes'])}", r["level"].upper()]
    if r["checkpoints"] is not None:
        parts.append(f"checkpoints {r['checkpoints']}" + (f"/{r['keep']}" if r["keep"] is not None else ""))
    if r["reasons"]:
        parts.append("; ".join(r["reasons"]))
    if ADVICE[r["level"]]:
        parts.append("-> " + ADVICE[r["level"]])
    return "  ".join(parts)


def _same_file(fd_a: int, fd_b: int) -> bool:
    try:
        a, b = os.fstat(fd_a), os.fstat(fd_b)
    except OSError:
        return True
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def emit(r: dict, as_json: bool) -> None:
    line = json.dumps(r) if as_json else human_line(r)
    # A monitor on a full disk must keep running even if its own log cannot grow.
    try:
        print(line, flush=True)
    except OSError:
        pass
    if r["level"] != "ok" and not _same_file(1, 2):
        try:
            print(f"monitor_disk: {human_line(r)}", file=sys.stderr, flush=True)
        except OSError:
            pass


def parent_alive(pid: int, original_ppid: int) -> bool:
    # Re-parenting catches pid reuse when the parent was our real parent; kill(pid, 0) covers an unrelated pid.
    if original_ppid == pid and os.getppid() != pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def parse_args(argv=None):
    ap = argparse.ArgumentParser(
        description="Watch disk use of the checkpoint folder; one line per reading.",
        epilog="Exit codes with --once: ok 0, warn 10, alert 20, critical 30; 2 = bad arguments.")
    ap.add_argument("--path", default="checkpoints", help="a path on the filesystem to watch (default: checkpoints)")
    ap.add_argument("--interval", type=float, default=600, help="seconds between readings (default 600)")
    ap.add_argument("--warn", type=float, default=60, help="percent used for 'warn' (default 60)")
    ap.add_argument("--alert", type=float, default=80, help="percent used for 'alert' (default 80)")
    ap.add_argument("--critical", type=float, default=90, help="percent used for 'critical' (default 90)")
    ap.add_argument("--once", action="store_true", help="one reading, exit code = its level")
    ap.add_argument("--json", action="store_true", help="one JSON object per line")
    ap.add_argument("--checkpoints", default=None, help="a run folder whose checkpoint-<step> folders are counted")
    ap.add_argument("--keep", type=int, default=None, help="more checkpoints than this is an alert")
    ap.add_argument("--parent-pid", type=int, default=None, help="exit when this process is gone (sidecar mode)")
    args = ap.parse_args(argv)
    if not 0 <= args.warn <= args.alert <= args.critical <= 100:
        ap.error("thresholds must satisfy 0 <= warn <= alert <= critical <= 100")
    if args.interval <= 0:
        ap.error("--interval must be positive")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.once:
        r = reading(args)
        emit(r, args.json)
        return EXIT_CODES[r["level"]]

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    original_ppid = os.getppid()
    while True:
        emit(reading(args), args.json)
        deadline = time.monotonic() + args.interval
        while time.monotonic() < deadline:
            if _stop_signal is not None:
                return 0
            if args.parent_pid is not None and not parent_alive(args.parent_pid, original_ppid):
                return 0
            time.sleep(min(POLL_S, max(0.0, deadline - time.monotonic())))
        if _stop_signal is not None:
            return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # Ctrl-C during a --once reading, before the handlers exist
        sys.exit(130)
