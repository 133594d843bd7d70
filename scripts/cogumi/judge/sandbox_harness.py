"""The two interpreter-side halves of the code sandbox (the kernel side is sandbox.py).

CANDIDATE runs in the contained process (namespaces, read-only mounts, uid 65534, rlimits): it runs the model's
program and then only ANSWERS CALLS. RUNNER is a separate, trusted process: it runs the problem's tests, calls the
program through proxies and decides pass or fail itself. Between them are two pipes and plain data
(plain_data.py): the tests receive values json.loads built, never an object of the program's, so an always-equal
object or an int subclass is refused on the candidate's side ("not plain data") or cannot even be expressed.
The verdict exists only in the runner; there is no pass token, no frame, builtin or test constant in the
candidate's address space to read or patch (ISSUES_LOG B60).

The candidate's process still refuses, through an audit hook (PEP 578), process creation, signals, ctypes (an
ImportError, so numpy still imports), sockets, rlimit changes and threads, and writes outside its work dir: a
first line only, the kernel's limits are what holds.

Runner rules, kept from the one-process harness:
  * the tests see the program's functions and classes as proxies, and its plain-data globals as values; a name
    that shadows a builtin is not exported unless it is the entry point (MBPP's `sum`);
  * a trusted prelude (HumanEval's prompt) runs in the tests' namespace first: the helpers it defines (poly,
    encode_cyclic, ...) are the prompt's own, the program's versions of them are never called by the tests;
  * an argument the program changes in place (a list it sorts) is changed in place for the tests too;
  * an exception the program raises reaches the tests as that builtin exception (anything else as
    CandidateError), so `pytest.raises`-style tests keep their meaning; a refused value or a protocol error ends
    the run at once (os._exit), so a test's own try/except cannot swallow it.
"""

from pathlib import Path

CODEC = Path(__file__).with_name("plain_data.py").read_text()
VERDICT_TAG = "COGUMI-VERDICT"  # the runner's last stdout line: COGUMI-VERDICT [passed, reason, judge_error]
ENDED = "the program ended before answering"

CANDIDATE = r'''
import sys, os
def _cogumi_candidate(fd_in, fd_out):
    import _thread, threading
''' + "\n".join("    " + line for line in CODEC.splitlines()) + r'''
    exit_now, start_thread, realpath, fspath = os._exit, _thread.start_new_thread, os.path.realpath, os.fspath
    message = receive(fd_in)
    if not message or message[0] != "program":
        exit_now(3)
    _, source, cwd, deny = message
    del message
    os.chdir(cwd)  # under a mount namespace the interpreter starts in the new root's "/"
    tmp = realpath(cwd)
    deny_read = tuple(realpath(p) for p in deny)

    def answer(*message):
        try:
            send(fd_out, list(message))
        except BaseException:
            exit_now(1)

    def described(exc):
        try:
            return f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        except BaseException:
            return "an exception that cannot be printed"

    blocked_events = {"os.fork", "os.forkpty", "os.system", "os.posix_spawn", "os.spawn", "os.exec", "os.kill",
                      "os.killpg", "signal.pthread_kill", "subprocess.Popen", "pty.spawn", "resource.setrlimit",
                      "resource.prlimit", "os.setuid", "os.chroot", "sys.addaudithook"}
    blocked_prefixes = ("ctypes.", "socket.", "os.exec", "os.spawn", "os.posix_spawn", "_posixsubprocess",
                        "mmap.")
    blocked_modules = {"ctypes", "_ctypes", "_posixsubprocess"}
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
                if (flags & write_flags or any(c in mode for c in "wax+")) and not inside(path, (tmp,)):
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

    try:
        program = compile(source, "<program>", "exec")
    except SyntaxError as exc:
        answer("broken", f"SyntaxError: {exc.msg} (line {exc.lineno} of the program)")
        exit_now(1)
    except BaseException as exc:
        answer("broken", f"the program cannot be compiled: {described(exc)}")
        exit_now(1)
    del source

    def refuse_threads(*args, **kwargs):
        raise RuntimeError("sandbox: starting threads is not allowed")

    def serve(done):
        # Not "__main__": an `if __name__ == "__main__":` demo (often reading input()) must not run.
        namespace = {"__name__": "__cogumi_program__"}
        try:
            exec(program, namespace)
        except BaseException as exc:
            answer("broken", described(exc) + " (in the program)")
            exit_now(1)
        functions, classes, values = [], [], {}
        for name, value in list(namespace.items()):
            if name.startswith("__") or type(value).__name__ == "module":
                continue
            if isinstance(value, type):
                classes.append(name)
            elif callable(value):
                functions.append(name)
            else:
                try:
                    to_plain(value)
                    values[name] = value
                except BaseException:
                    pass  # not plain data: the tests cannot use it, as before
        answer("ready", functions, classes, values)
        # Instances of the program's classes that the tests construct stay here; the tests hold handles.
        objects = {}

        def ref_of(value):
            return id(value) if objects.get(id(value)) is value else None

        def make_ref(handle):
            return objects[handle]

        while True:
            try:
                message = receive(fd_in, make_ref)
            except BaseException:
                exit_now(1)
            if message is None:
                exit_now(0)
            kind, handle_refs, args, kwargs = message[0], None, [], {}
            try:
                if kind == "call":
                    target = namespace[message[1]]
                    label, args, kwargs = message[1], message[2], message[3]
                    result = target(*args, **kwargs)
                    if isinstance(target, type):
                        if type(result) is not target:
                            answer("fail", f"{label}() returned a {type(result).__name__}, not a {label}")
                            exit_now(1)
                        objects[id(result)] = result
                        handle_refs = ref_of
                elif kind == "getattr":
                    label = f".{message[2]}"
                    result = getattr(message[1], message[2])
                    if callable(result) and ref_of(result) is None:
                        answer("method")
                        continue
                    handle_refs = ref_of
                elif kind == "setattr":
                    label = f".{message[2]}"
                    result = setattr(message[1], message[2], message[3])
                elif kind == "method":
                    label, args, kwargs = f".{message[2]}", message[3], message[4]
                    result = getattr(message[1], message[2])(*args, **kwargs)
                    handle_refs = ref_of
                else:
                    exit_now(1)
            except BaseException as exc:
                try:
                    text = str(exc)[:300]
                except BaseException:
                    text = "an exception that cannot be printed"
                answer("raised", type(exc).__name__, text)
                continue
            try:
                reply = ["return", to_plain(result, 0, handle_refs)]  # trees: sent as they are (send_tree)
            except BaseException as exc:
                text = str(exc) if isinstance(exc, NotPlain) else described(exc)
                answer("fail", f"{label}() returned {text}, not plain data ({PLAIN_TYPES})")
                exit_now(1)
            try:
                reply += [to_plain(args, 0, ref_of), to_plain(kwargs, 0, ref_of)]
            except BaseException as exc:
                text = str(exc) if isinstance(exc, NotPlain) else described(exc)
                answer("fail", f"{label}() left {text} in an argument, not plain data ({PLAIN_TYPES})")
                exit_now(1)
            try:
                send_tree(fd_out, reply)
            except BaseException:
                exit_now(1)

    sys.addaudithook(hook)
    _thread.stack_size(64 << 20)  # deep recursion in model code needs more than a thread's default stack
    done = _thread.allocate_lock()
    done.acquire()
    _thread.start_new_thread = refuse_threads
    threading._start_new_thread = refuse_threads
    start_thread(serve, (done,))  # the saved original
    done.acquire()  # never released: serve() ends the process itself
_cogumi_candidate(int(sys.argv[1]), int(sys.argv[2]))
'''

RUNNER = r'''
import sys, os
def _cogumi_runner(fd_to, fd_from):
    import builtins, json
''' + "\n".join("    " + line for line in CODEC.splitlines()) + r'''
    job = json.loads(sys.stdin.buffer.read())
    out, exit_now = os.dup(1), os._exit

    def verdict(passed, reason, judge_error=False):
        try:
            sys.stdout.flush()
        except BaseException:
            pass
        os.write(out, ("\n" + TAG + " " + json.dumps([passed, reason, judge_error]) + "\n").encode())
        exit_now(0)

    remotes = {}

    class Remote:
        """An object of the program's class (one the tests constructed): it stays in the candidate's process;
        attributes and methods are calls there. Compared by identity here, never by the program's __eq__."""
        __slots__ = ("_handle",)

        def __init__(self, handle):
            object.__setattr__(self, "_handle", handle)

        def __getattr__(self, name):
            handle = object.__getattribute__(self, "_handle")
            reply = exchange(["getattr", {"t": "ref", "v": handle}, name])
            if reply == ["method"]:
                def method(*args, **kwargs):
                    request = outgoing(["method", self, name, list(args), kwargs], name)
                    return returned(exchange(request), args, kwargs)
                return method
            return returned(reply, (), {})

        def __setattr__(self, name, value):
            returned(exchange(outgoing(["setattr", self, name, value], name)), (), {})

    def ref_of(value):
        return object.__getattribute__(value, "_handle") if type(value) is Remote else None

    def make_ref(handle):
        if handle not in remotes:
            remotes[handle] = Remote(handle)
        return remotes[handle]

    def exchange(tree):
        try:
            send_tree(fd_to, tree)
            reply = receive(fd_from, make_ref)
        except (OSError, ValueError, RecursionError, TypeError, MemoryError) as exc:
            if isinstance(exc, OSError):
                verdict(False, "failed: " + ENDED)
            verdict(False, f"failed: the program answered with something other than plain data "
                           f"({type(exc).__name__}: {str(exc)[:200]})")
        if reply is None:
            verdict(False, "failed: " + ENDED)
        if type(reply) is not list or not reply:
            verdict(False, "failed: the program answered out of turn")
        return reply

    def outgoing(message, name):
        try:
            return to_plain(message, 0, ref_of)
        except NotPlain as exc:
            verdict(False, f"judge_error: the tests pass {exc} to {name}(): it cannot cross to the "
                           f"program's process", judge_error=True)

    ready = exchange(to_plain(["program", job["program"], job["cwd"], job["deny_read"]]))
    if ready[0] == "broken":
        verdict(False, "failed: " + str(ready[1]))
    if (ready[0] != "ready" or len(ready) != 4 or type(ready[1]) is not list or type(ready[2]) is not list
            or type(ready[3]) is not dict):
        verdict(False, "failed: the program answered out of turn")
    _, functions, classes, values = ready

    class CandidateError(Exception):
        """An exception of the program's own class, re-raised here by name and message."""

    def same_shape_update(old, new):  # an argument the program changed in place changes here too
        if old == new or type(old) is not type(new):
            return
        if type(old) is list:
            old[:] = new
        elif type(old) is dict or type(old) is set:
            old.clear()
            old.update(new)

    def returned(reply, args, kwargs):
        kind = reply[0]
        if kind == "return" and len(reply) == 4 and type(reply[2]) is list and type(reply[3]) is dict:
            for old, new in zip(args, reply[2]):
                same_shape_update(old, new)
            for key, old in kwargs.items():
                same_shape_update(old, reply[3].get(key))
            return reply[1]
        if kind == "raised" and len(reply) == 3:
            exc_type = getattr(builtins, str(reply[1]), None)
            if isinstance(exc_type, type) and issubclass(exc_type, Exception) and exc_type is not StopIteration:
                raise exc_type(str(reply[2]))
            raise CandidateError(str(reply[2]))
        if kind == "fail":
            verdict(False, "failed: " + str(reply[1]))
        verdict(False, "failed: the program answered out of turn")

    def proxy(name):
        def call(*args, **kwargs):
            return returned(exchange(outgoing(["call", name, list(args), kwargs], name)), args, kwargs)
        call.__name__ = call.__qualname__ = name
        return call

    tests_ns = {"__name__": "__cogumi_tests__"}
    entry = job.get("entry_point")
    if job.get("prelude"):
        exec(compile(job["prelude"], "<prelude>", "exec"), tests_ns)
    trusted = {n for n in tests_ns if n != entry}

    def exported(name):  # what the program may name in the tests' namespace
        return (type(name) is str and name.isidentifier() and not name.startswith("__") and name not in trusted
                and (name == entry or not hasattr(builtins, name)))

    for name in [*functions, *classes]:
        if exported(name):
            tests_ns[name] = proxy(name)
    for name, value in values.items():
        if exported(name):
            tests_ns[name] = value
    try:
        exec(compile(job["tests"], "<tests>", "exec"), tests_ns)
    except BaseException as exc:
        try:
            text = f"{type(exc).__name__}: {exc}".replace("\n", " ")[:300]
        except BaseException:
            text = "an exception that cannot be printed"
        verdict(False, "failed: " + text)
    verdict(True, "passed")
_cogumi_runner(int(sys.argv[1]), int(sys.argv[2]))
'''.replace("TAG + ", repr(VERDICT_TAG) + " + ").replace("+ ENDED", "+ " + repr(ENDED))
