"""The in-process half of the code sandbox: the harness the sandboxed interpreter runs around a program.

It is passed with `python -I -c`, so it is in no file; it holds no secret itself (the job, with the pass token,
arrives through the pipe named by argv[1]). What it enforces, inside the interpreter (the kernel side is in
sandbox.py: namespaces, read-only mounts, uid drop, rlimits):
  * the program runs in its own globals; the tests run in ANOTHER namespace with fresh builtins, and see the
    program only through exported names: functions wrapped so that every value they return must be plain data
    (exact int/float/complex/bool/str/bytes/None, and list/tuple/set/frozenset/dict of those, recursively; a
    Counter/OrderedDict/defaultdict is read as the dict it is), classes the tests construct, and plain-data
    globals. A name that shadows a builtin is not exported (unless it is the entry point the tests call). An
    object whose `__eq__` is always true, or an `int` subclass, fails with a reason, and the wrapper exits the
    process itself, so a test's own try/except cannot swallow it;
  * the functions and classes of every module imported before the program ran (builtins, math, re, collections,
    ...) are checked after each call into the program and at the end: a patched `math.isclose` is a failure;
    threads cannot be started (the program could patch and restore between two checks otherwise);
  * an audit hook (PEP 578) refuses process creation, signals, ctypes (its import fails as an ImportError, so
    a library that does without it, numpy, still imports), sockets, rlimit changes, and every way to a frame
    (sys._getframe, sys._current_frames outside the main thread, tb_frame/gi_frame/f_back ...), so the program
    cannot reach or rebind the harness's state; it also refuses writes outside the temp dir and
    reads of the eval data (a first line only: the kernel's mounts are what holds, see sandbox.py);
  * the pass signal is a random token the MAIN thread prints, on stdout with exit code 0, only once the worker
    thread (started with _thread, so no Thread object the program could edit) is gone from the interpreter's
    thread table, and every failure path of the worker ends in os._exit(1).
"""

HARNESS = r'''
import sys, os
def _cogumi_main(fd):
    import builtins, json, time, types, _thread, threading, collections
    import math, re, random, itertools, functools, heapq, string, operator, copy, bisect, statistics, fractions
    import decimal, cmath, hashlib, datetime, typing
    data = bytearray()
    while True:
        chunk = os.read(fd, 1 << 16)
        if not chunk:
            break
        data += chunk
    os.close(fd)
    job = json.loads(bytes(data))
    del data
    write, exit_now, out_fd, err_fd, tag = os.write, os._exit, os.dup(1), os.dup(2), job["tag"]
    current_frames, sleep, get_ident = sys._current_frames, time.sleep, _thread.get_ident
    start_thread, main_ident = _thread.start_new_thread, _thread.get_ident()
    realpath, fspath, ModuleType, MISSING = os.path.realpath, os.fspath, types.ModuleType, object()
    tmp = realpath(job["cwd"])
    deny_read = tuple(realpath(p) for p in job["deny_read"]) + ("/proc", "/sys")

    def fail(text):
        try:
            write(err_fd, f"\n{tag} failed: {text}\n".encode("utf-8", "replace"))
        finally:
            exit_now(1)

    blocked_events = {"os.fork", "os.forkpty", "os.system", "os.posix_spawn", "os.spawn", "os.exec", "os.kill",
                      "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn", "resource.setrlimit",
                      "resource.prlimit", "gc.get_objects", "gc.get_referrers", "gc.get_referents", "sys.settrace",
                      "sys.setprofile", "os.setuid", "os.chroot", "sys.addaudithook", "sys._current_exceptions",
                      "sys._getframemodulename"}
    blocked_prefixes = ("sys.monitoring", "ctypes.", "socket.", "os.exec", "os.spawn", "os.posix_spawn",
                        "_posixsubprocess", "winreg.", "mmap.")
    blocked_modules = {"ctypes", "_ctypes", "_posixsubprocess"}
    # Frames are the way to the tests' globals and the harness's locals: a frame comes only from these
    # attributes or sys._getframe, which only stdlib modules that use the frame internally may call.
    frame_attrs = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}
    import dataclasses, enum, logging, warnings
    frame_users = {m.__file__ for m in (collections, typing, enum, warnings, dataclasses, logging)}
    getframe = sys._getframe
    write_events = {"os.remove", "os.rmdir", "os.rename", "os.truncate", "os.chmod", "os.chown", "os.link",
                    "os.symlink", "os.mkdir", "os.utime", "shutil.rmtree", "shutil.copyfile", "shutil.copymode",
                    "shutil.copystat", "shutil.move", "os.chflags", "os.lchown", "os.lchmod", "os.setxattr",
                    "os.removexattr", "os.mkfifo", "os.mknod"}
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
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
            if event == "sys._getframe" and get_ident() != main_ident:
                if getframe(1).f_code.co_filename not in frame_users:
                    raise PermissionError("sandbox: sys._getframe is not allowed")
            if event == "object.__getattr__" and len(args) > 1 and args[1] in frame_attrs:
                raise PermissionError(f"sandbox: reading .{args[1]} is not allowed")
            if event in blocked_events or event.startswith(blocked_prefixes):
                raise PermissionError(f"sandbox: {event} is not allowed")
            if event == "import" and str(args[0]).split(".")[0] in blocked_modules:
                raise ImportError(f"sandbox: import {args[0]} is not allowed")
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

    # ---- plain data across the boundary
    scalars = {int, float, complex, bool, str, bytes, type(None)}
    sequences = {list, tuple, set, frozenset}
    dict_like = {dict, collections.Counter, collections.OrderedDict, collections.defaultdict}

    def plain(value, where, depth=0):
        kind = type(value)
        if kind in scalars:
            return value
        if depth > 100:
            fail(f"{where} returned data nested more than 100 deep (or a cycle)")
        if kind in sequences:
            for item in value:
                plain(item, where, depth + 1)
            return value
        if kind in dict_like:
            value = dict(value) if kind is not dict else value
            for key, item in value.items():
                plain(key, where, depth + 1)
                plain(item, where, depth + 1)
            return value
        fail(f"{where} returned an object of type {kind.__name__}, not plain data (int, str, list, dict, ...)")

    # ---- the modules the tests may use: their functions and classes must stay what they were
    def snapshot(names):
        out = []
        for name in names:
            mod = sys.modules.get(name)
            if isinstance(mod, ModuleType) and name != "__main__":
                keep = {k: v for k, v in mod.__dict__.items() if callable(v) or isinstance(v, ModuleType)}
                out.append((name, mod, mod.__dict__, keep))
        return out

    def tampered(saved):
        for name, mod, namespace, keep in saved:
            if sys.modules.get(name, mod) is not mod or mod.__dict__ is not namespace:
                return f"sys.modules[{name!r}]"
            for key, value in keep.items():
                if namespace.get(key, MISSING) is not value:
                    return f"{name}.{key}"
        return None

    def refuse_threads(*args, **kwargs):
        raise RuntimeError("sandbox: starting threads is not allowed")

    _thread.start_new_thread = refuse_threads
    threading._start_new_thread = refuse_threads
    hot = snapshot(["builtins", "math", "re", "random", "collections", "itertools", "functools", "heapq",
                    "string", "operator", "copy", "bisect", "statistics", "fractions", "decimal", "cmath",
                    "hashlib", "sys", "_thread", "threading"])
    every = snapshot(list(sys.modules))

    def export(program_ns, pristine, entry):
        exported = {}
        for name, value in list(program_ns.items()):
            if name.startswith("__") or isinstance(value, ModuleType) or (name in pristine and name != entry):
                continue
            if isinstance(value, type):
                exported[name] = constructor(value, name)
            elif callable(value):
                exported[name] = wrapped(value, name)
            elif type(value) in scalars or type(value) in sequences or type(value) in dict_like:
                exported[name] = plain(value, name)
        return exported

    def wrapped(fn, name):
        def call(*args, **kwargs):
            result = plain(fn(*args, **kwargs), f"{name}()")
            patched = tampered(hot)
            if patched:
                fail(f"the program patched {patched}")
            return result
        return call

    def constructor(cls, name):
        def make(*args, **kwargs):
            obj = cls(*args, **kwargs)
            if type(obj) is not cls:
                fail(f"{name}() returned a {type(obj).__name__}, not a {name}")
            return obj
        return make

    # The worker thread runs the program, then the tests. Every way out of it except finishing the tests ends in
    # os._exit(1), `finally` included, so a program cannot turn a failure into a normal return.
    def worker(program, tests, pristine, entry, started):
        stage = "program"
        started.release()  # from here on this thread has a frame in the thread table until it ends
        try:
            # Not "__main__": an `if __name__ == "__main__":` demo (often reading input()) must not run.
            program_ns = {"__name__": "__cogumi_program__", "__builtins__": dict(pristine)}
            exec(program, program_ns)
            stage = "tests"
            tests_ns = {"__name__": "__cogumi_tests__", "__builtins__": dict(pristine)}
            tests_ns.update(export(program_ns, pristine, entry))
            exec(tests, tests_ns)
        except BaseException as exc:
            try:
                text = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
            except BaseException:
                text = "an exception that cannot be printed"
            try:
                fail(text + (" (in the program)" if stage == "program" else ""))
            finally:
                exit_now(1)

    try:
        program = compile(job["program"], "<program>", "exec")
    except SyntaxError as exc:
        fail(f"SyntaxError: {exc.msg} (line {exc.lineno} of the program)")
    except BaseException as exc:
        fail(f"the program cannot be compiled: {type(exc).__name__}: {exc}")
    tests = compile(job["tests"], "<tests>", "exec")
    started = _thread.allocate_lock()
    started.acquire()
    args = (program, tests, types.MappingProxyType(dict(builtins.__dict__)), job.get("entry_point"), started)
    token = job.pop("token")
    del job
    sys.addaudithook(hook)
    _thread.stack_size(64 << 20)  # deep recursion in model code needs more than a thread's default stack
    ident = start_thread(worker, args)
    del args
    started.acquire()  # a thread not yet running has no frame: without this the loop below could end at once
    # The token lives only in this (main) thread's frame, which no frame the program can reach leads to.
    while ident in current_frames():
        sleep(0.005)
    if len(current_frames()) != 1:
        fail("the program left threads running")
    patched = tampered(every)
    if patched:
        fail(f"the program patched {patched}")
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass
    write(out_fd, f"\n{token}\n".encode())
    exit_now(0)
_cogumi_main(int(sys.argv[1]))
'''
