"""MATH judge: pull the final answer out of a model's output (math_extract) and compare it with the gold.

`compare(pred, gold, question=...)` decides in this order, each step final when it applies:
  1. multiple choice: a gold `(C)`/`C` needs the same letter;
  2. percent: a pred written as a percentage equals only a gold that is one (`18%` is not gold 18), unless the
     question asks for a percent ("what percent of ...": then gold 18 is `18\\%`);
  3. words: a `\\text{}`/plain-word answer is compared as lower-case words, never as symbols (`east` != `seat`);
  4. `normalize` both (math_normalize: separators, units, degrees, mixed numbers, repeating decimals, ...) and
     compare the strings;
  5. math_equal in a worker process with a hard time limit: exact numbers, a rounded gold's stated decimal
     precision (rounded: the question asks to round or approximate, or the gold says `\\approx`; with no
     question known every decimal gold is taken as rounded), symbolic expressions, tuples/intervals/sets/unions,
     equations;
  6. a gold the parser cannot read (an inequality form it does not know, odd text) equals a pred that is the
     same string once spacing, braces and relation spellings are evened out; only otherwise a judge error.
A comparison the judge cannot finish (the worker timed out, died or could not start; valid LaTeX the parser does
not know; a gold it cannot read) is a judge error, never a wrong answer: `judge_math` returns a Verdict with
judge_error=True and the real cause (ISSUES_LOG B11).
"""

from __future__ import annotations

import json
import logging
import os
import re
import select
import subprocess
import sys
import threading
from typing import NamedTuple

from cogumi.core.paths import SCRIPTS_DIR
from cogumi.evaluate.records import Verdict
from cogumi.judge.math_extract import extract_answer, extract_answer_with_source, last_boxed
from cogumi.judge.math_normalize import canonical, choice_letter, is_percent, normalize, word_answer

__all__ = ["Comparison", "compare", "extract_answer", "extract_answer_with_source", "is_equiv", "judge_math",
           "last_boxed", "normalize"]

log = logging.getLogger(__name__)


class Comparison(NamedTuple):
    equal: bool | None  # None: the judge could not decide (see cause)
    cause: str = ""  # why it is undecided, or which rule decided


class _SympyWorker:
    """One long-lived process for the sympy comparisons; killed and restarted when a comparison overruns.

    A plain `python -c` subprocess rather than multiprocessing: no re-import of the caller's __main__, no fork of
    a process that may hold threads or CUDA state. Its stderr goes to a temp file so a death is explained.
    """

    START_TIMEOUT_S = 60.0
    EXIT_WAIT_S = 10.0  # after the worker closed its output: how long its exit may take to be seen

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None
        self._stderr = None

    def _readline(self, timeout_s: float) -> str | None:
        """The worker's next line; None when it wrote none within timeout_s; "" at end of file. End of file means
        the worker is exiting: its output closes before its exit status exists, so wait for that status, or a
        death would read as a time limit (ISSUES_LOG B35)."""
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        if not ready:
            return None
        line = self._proc.stdout.readline()
        if not line:
            try:
                self._proc.wait(timeout=self.EXIT_WAIT_S)
            except subprocess.TimeoutExpired:
                pass  # still running with its output closed: described as "no reply"
        return line.strip()

    def _death(self) -> str:
        """Why the worker is gone: its exit status and the last line it wrote to stderr."""
        rc = self._proc.poll() if self._proc is not None else None
        if rc is None:
            return "no reply"
        how = f"killed by signal {-rc}" if rc < 0 else f"exit code {rc}"
        tail = ""
        if self._stderr is not None:
            self._stderr.seek(0)
            lines = self._stderr.read().decode("utf-8", "replace").strip().splitlines()
            tail = f": {lines[-1][:200]}" if lines else ""
        return f"the judge worker died ({how}){tail}"

    def _start(self) -> str | None:
        """None when started, else the cause."""
        import tempfile

        scripts = str(SCRIPTS_DIR)
        env = {**os.environ, "PYTHONPATH": scripts + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._stderr = tempfile.TemporaryFile()
        self._proc = subprocess.Popen([sys.executable, "-c", "from cogumi.judge.math_equal import serve; serve()"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._stderr,
                                      text=True, env=env, bufsize=1)
        line = self._readline(self.START_TIMEOUT_S)
        if line == "ready":
            return None
        cause = (f"the judge worker did not start within {self.START_TIMEOUT_S:.0f} s"
                 if line != "" and self._proc.poll() is None
                 else self._death().replace("died", "died while starting"))
        self._stop()
        return cause

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout, self._stderr):
                try:
                    pipe.close()
                except (OSError, AttributeError):
                    pass
        self._proc, self._stderr = None, None

    def compare(self, pred: str, gold: str, timeout_s: float, rounded: bool = True) -> Comparison:
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._stop()
                cause = self._start()
                if cause:
                    return Comparison(None, cause)
            try:
                self._proc.stdin.write(json.dumps([pred, gold, rounded]) + "\n")
                self._proc.stdin.flush()
                answer = self._readline(timeout_s)
            except (OSError, ValueError):
                answer = None
            if answer:
                reply = json.loads(answer)
                if "error" in reply:
                    return Comparison(None, reply["error"])
                return Comparison(reply["equal"], reply.get("note", "sympy"))
            cause = (f"the comparison ran past the {timeout_s:g} s limit"
                     if answer is None and self._proc.poll() is None else self._death())
            self._stop()
            return Comparison(None, cause)

    def close(self) -> None:
        with self._lock:
            self._stop()


_WORKER = _SympyWorker()


# The question asks for a percentage ("What percent of ...?", "express it as a percent"), not merely mentions one
# ("20 percent are boys; how many girls?" asks for a count: 18% is not gold 18 there)
_ASKS_PERCENT = re.compile(r"\b(?:what|which|how\s+many|by\s+how\s+much)\b[^.?!]{0,40}?(?:\bpercent(?:age)?\b|\\?%)"
                           r"|\b(?:as|in|into)\s+(?:a\s+)?(?:percent(?:age)?s?\b|\\?%)", re.I)
# The question asks for a rounded value: "to the nearest tenth", "round to two decimal places", "approximately"
_ASKS_ROUNDING = re.compile(r"\bround(?:ed|ing)?\b|\bnearest\b|\bdecimal\s+places?\b|\bsignificant\s+(?:figures|digits)"
                            r"|\bapproximat(?:e|ely|ion)\b|\bestimate\b|\b(?:tenths?|hundredths?|thousandths?)\b", re.I)


def asks_for_percent(question: str | None) -> bool:
    return bool(question) and bool(_ASKS_PERCENT.search(question))


def gold_is_rounded(gold: str, question: str | None) -> bool:
    """Whether a decimal gold is a rounded value (then a finer decimal that rounds to it is right) or an exact
    one (then only its value is): from the gold's form (`\\approx`) and the problem (does it ask to round?).
    With no question known, the old rule: every decimal gold states its precision."""
    if re.search(r"\\approx|≈", gold):
        return True
    return question is None or bool(_ASKS_ROUNDING.search(question))


def _loose(s: str) -> str:
    """normalize, and relation spellings, braces and `\\text` evened out: the last resort for an unreadable gold."""
    s = normalize(s)
    s = re.sub(r"\\geqslant|\\geq|\\ge(?![a-z])|>=|≥", ">=", s)
    s = re.sub(r"\\leqslant|\\leq|\\le(?![a-z])|<=|≤", "<=", s)
    s = re.sub(r"\\neq|\\ne(?![a-z])|≠", "!=", s)
    return s.replace("{", "").replace("}", "").replace("\\", "").lower()


def compare(pred: str | None, gold: str | None, timeout_s: float = 2.0, question: str | None = None) -> Comparison:
    """Whether `pred` is the gold answer, and the rule that decided (see the module docstring). question: the
    problem's text, when known (percent and rounding rules read it)."""
    if pred is None or gold is None or not normalize(pred) or not normalize(gold):
        return Comparison(False, "empty")
    letter = choice_letter(gold)
    if letter is not None:
        return Comparison(choice_letter(pred) == letter, "choice letter")
    if is_percent(pred) and not is_percent(gold) and not asks_for_percent(question):
        return Comparison(False, "percent against a gold that is not a percentage")
    words_pred, words_gold = word_answer(pred), word_answer(gold)
    if words_pred is not None or words_gold is not None:
        if words_pred == words_gold:
            return Comparison(True, "words")
        if words_gold is not None:
            return Comparison(False, "words")
    a, b = normalize(pred), normalize(gold)
    if a == b:
        return Comparison(True, "normalized strings")
    result = _WORKER.compare(canonical(pred), canonical(gold), timeout_s, gold_is_rounded(gold, question))
    if result.equal is None and result.cause.startswith("parser"):  # LaTeX it does not know, or an unreadable gold
        if _loose(pred) == _loose(gold):
            return Comparison(True, "normalized strings (the parser cannot read them)")
    return result


def is_equiv(pred: str | None, gold: str | None, timeout_s: float = 2.0) -> bool:
    """True when `pred` and `gold` are the same answer; an undecided comparison (judge error) is False here:
    use `compare` or `judge_math` to tell the two apart."""
    return compare(pred, gold, timeout_s).equal is True


def judge_math(output: str | None, gold: str | None, *, timeout_s: float = 2.0, hit_token_limit: bool = False,
               question: str | None = None) -> Verdict:
    """Judge one model output against the gold final answer. Never raises for odd text.

    hit_token_limit: the output was cut off at max_new_tokens (then there is no last-number fallback).
    question: the problem's text, when known: several boxed roots, percent answers and rounded golds depend on it.
    """
    try:
        answer, source = extract_answer_with_source(output, hit_token_limit=hit_token_limit, question=question)
        if answer is None:
            reason = "no answer (cut off at the token limit)" if hit_token_limit else "no answer"
            return Verdict(False, reason, None)
        result = compare(answer, gold, timeout_s=timeout_s, question=question)
    except Exception as exc:  # a judge bug must not take the benchmark down, nor count as a wrong answer
        log.exception("math judge error")
        return Verdict(False, f"judge_error: {type(exc).__name__}: {exc}", None, judge_error=True)
    if result.equal is None:
        log.warning("math judge error on %r vs gold %r: %s", answer[:80], (gold or "")[:80], result.cause)
        return Verdict(False, f"judge_error: {result.cause}", answer, judge_error=True)
    via = "" if source == "boxed" else f", from the {source}"
    verdict = "passed" if result.equal else "wrong answer"
    return Verdict(result.equal, f"{verdict} ({result.cause}{via})", answer)
