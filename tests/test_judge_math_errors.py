"""Extraction on real model formats, and judge errors that are never wrong answers (ISSUES_LOG B12, B11)."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest

from cogumi.judge.judge_math import compare, extract_answer_with_source, judge_math


@pytest.mark.parametrize("text, answer, source", [
    ("So we get 18 in total.\n\nThe answer is **18**.", "18", "answer phrase"),
    ("Work...\n\n**Answer:** 18", "18", "answer phrase"),
    ("## Final Answer: 18", "18", "answer phrase"),
    ("The answer is $18 per day.", "18", "answer phrase"),
    ("The answer is 18 dollars.", "18", "answer phrase"),
    ("The answer is \\$1,250.50 in total.", "1,250.50", "answer phrase"),
    ("First guess: the answer is 12, which is wrong. Checking again, the answer is 18.", "18", "answer phrase"),
    ("the answer is 12.\nOn reflection the final answer is 20.", "20", "answer phrase"),
    ("The answer is $\\frac{3}{4}$.", "\\frac{3}{4}", "answer phrase"),
    ("The answer is \\(\\sqrt{2}\\).", "\\sqrt{2}", "answer phrase"),
    ("The answer is 45%.", "45\\%", "answer phrase"),
    ("The answer is $5 + 3 = 8$.", "8", "answer phrase"),
    ("The answer is $x = 8$.", "x = 8", "answer phrase"),
    ("The answer is $18$ per day.", "18", "answer phrase"),
])
def test_extraction_of_real_model_formats(text, answer, source):
    assert extract_answer_with_source(text) == (answer, source)


def test_no_last_number_fallback_on_output_cut_off_at_the_token_limit():
    loop = "Let me recompute. 3 + 15 = 18. " * 40  # a repetition loop that happens to end on the gold
    assert judge_math(loop, "18").passed  # an output that ended on its own may use the last number
    cut = judge_math(loop, "18", hit_token_limit=True)
    assert not cut.passed and cut.reason == "no answer (cut off at the token limit)"
    assert judge_math(loop + "\\boxed{18}", "18", hit_token_limit=True).passed  # a box still counts


def test_percent_only_where_the_gold_is_a_percentage():
    assert not judge_math("The answer is 18%.", "18").passed
    assert judge_math("The answer is 18%.", "18\\%").passed
    assert judge_math("The answer is 18.", "18\\%").passed


def test_verdict_reasons_name_the_rule():
    assert judge_math("\\boxed{\\text{seat}}", "\\text{east}").reason == "wrong answer (words)"
    assert judge_math("\\boxed{\\frac{9}{4}}", "2\\frac{1}{4}").reason == "passed (normalized strings)"


def test_a_timeout_is_a_judge_error_not_a_wrong_answer():
    verdict = judge_math("\\boxed{9^{9^{9^{9}}}}", "2", timeout_s=0.5)
    assert verdict.judge_error and not verdict.passed
    assert verdict.reason == "judge_error: the comparison ran past the 0.5 s limit"
    assert compare("2\\sqrt{2}", "\\sqrt{8}").equal is True  # a fresh worker takes the next comparison


def test_unsupported_latex_is_a_judge_error_with_its_cause():
    verdict = judge_math("\\boxed{\\mathcal{H}}", "\\mathcal{H}x")
    assert verdict.judge_error and "unsupported command \\mathcal" in verdict.reason
    garbage = judge_math("\\boxed{I think 5?}", "5")  # an unreadable answer is just not the answer
    assert not garbage.passed and not garbage.judge_error


def judge_workers() -> list[tuple[int, str]]:
    """(pid, state) of this process's sympy judge workers, read from /proc: children running math_equal's loop."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state, ppid = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
            command = (entry / "cmdline").read_bytes()
        except (OSError, ValueError):
            continue  # gone meanwhile
        if int(ppid) == os.getpid() and b"math_equal import serve" in command:
            found.append((int(entry.name), state))
    return found


@pytest.mark.parametrize("signum, death", [
    (signal.SIGKILL, "the judge worker died (killed by signal 9)"),  # as the OOM killer does: nothing on stderr
    (signal.SIGINT, "the judge worker died (killed by signal 2): KeyboardInterrupt"),  # its last stderr line
])
def test_a_dead_worker_is_named_as_such(signum, death):
    # The worker dies in the middle of a comparison: the cause is its death, never the time limit. Its output
    # closes before its exit status exists; reading the end of file as "no answer yet" blamed the time limit.
    assert compare("2\\sqrt{2}", "\\sqrt{8}").equal is True  # the worker is up, idle, waiting for a line
    (pid, _), = judge_workers()
    verdicts = []
    comparison = threading.Thread(target=lambda: verdicts.append(judge_math("\\boxed{9^{9^{9^{9}}}}", "2",
                                                                            timeout_s=120)))
    comparison.start()
    deadline = time.monotonic() + 60
    while dict(judge_workers()).get(pid) != "R":  # running: it has the comparison
        assert time.monotonic() < deadline and comparison.is_alive(), judge_workers()
        time.sleep(0.005)
    os.kill(pid, signum)
    comparison.join(timeout=60)
    assert not comparison.is_alive()
    (verdict,) = verdicts
    assert verdict.judge_error and not verdict.passed
    assert verdict.reason == f"judge_error: {death}"
    assert compare("2\\sqrt{2}", "\\sqrt{8}").equal is True  # a fresh worker takes the next comparison
