"""MATH judge: pull the final answer out of a model's output and compare it with the gold answer.

Extraction (`extract_answer_with_source`), in order; the first that finds something wins:
  1. "boxed":         the content of the LAST `\\boxed{...}` / `\\boxed x` / `\\fbox{...}` (nested braces handled);
  2. "answer phrase": the last "final answer is X", "Final Answer: X", "answer is X" or "Answer: X"
                      (Minerva's "Final Answer: The final answer is X. I hope it is correct." included);
  3. "last number":   the last number in the text (integer, decimal, a/b, thousands separators allowed).
Fallbacks 2 and 3 exist because small models often forget the box; they only ever make a right answer count
that a human grader would also accept, and the source is recorded in the verdict's reason.

Comparison (`is_equiv`): `normalize` both sides (the MATH paper's string normalisation plus a few extras, see
its docstring) and compare strings; if they differ, parse both with the small LaTeX parser below into sympy
expressions and test symbolic/numeric equality — tuples and intervals element-wise, unbracketed lists as
multisets. The sympy part runs in a separate worker process with a hard time limit: a pathological answer
(`9^{9^{9^9}}`, a huge expansion) gets the worker killed and the pair judged unequal; the call never hangs.
sympy's own LaTeX parser needs antlr, which the stack does not ship, hence the parser here.
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

from cogumi.core.paths import SCRIPTS_DIR
from cogumi.evaluate.records import Verdict

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------- extraction


def _braced(text: str, start: int) -> tuple[str, int] | None:
    """The content of the brace group opening at text[start] == "{" and the index after it; None if unbalanced."""
    depth = 0
    for i in range(start, len(text)):
        ch = text[i]
        if ch == "\\":  # an escaped brace (\{ \}) does not open or close a group
            continue
        if ch == "{" and (i == 0 or text[i - 1] != "\\"):
            depth += 1
        elif ch == "}" and (i == 0 or text[i - 1] != "\\"):
            depth -= 1
            if depth == 0:
                return text[start + 1:i], i + 1
    return None


_BOX = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def last_boxed(text: str | None) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`, or `\\boxed x`) in `text`; None if there is none.

    Nested braces are matched; an unclosed last box falls back to the previous complete one.
    """
    if not text:
        return None
    for match in reversed(list(_BOX.finditer(text))):
        i = match.end()
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            group = _braced(text, i)
            if group is not None:
                return group[0].strip()
            continue
        if i > match.end():  # "\boxed 5$": the argument runs to the next "$", newline or the end
            rest = re.split(r"[$\n]", text[i:], maxsplit=1)[0].strip()
            if rest:
                return rest.rstrip(".")
    return None


_PHRASES = [
    re.compile(r"final answer is\s*:?\s*(.+)", re.I),
    re.compile(r"final answer\s*:\s*(.+)", re.I),
    re.compile(r"answer is\s*:?\s*(.+)", re.I),
    re.compile(r"(?:^|\n)\s*\**answer\**\s*:\s*(.+)", re.I),
]
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")


def _clean_phrase(ans: str) -> str:
    ans = ans.strip()
    # Minerva's format ends with ". I hope it is correct."
    ans = re.split(r"\.\s+I hope it is correct", ans, maxsplit=1, flags=re.I)[0]
    ans = ans.strip().rstrip(".").strip()
    if ans.startswith("$") and ans.count("$") >= 2:  # "$\frac{1}{2}$." or "$x$ and ..."
        ans = ans[1:ans.index("$", 1)]
    return ans.strip()


def extract_answer_with_source(text: str | None) -> tuple[str | None, str]:
    """(answer, source) where source is "boxed", "answer phrase", "last number" or "none"."""
    if not text:
        return None, "none"
    boxed = last_boxed(text)
    if boxed:
        return boxed, "boxed"
    for pattern in _PHRASES:
        matches = list(pattern.finditer(text))
        if matches:
            line = matches[-1].group(1).split("\n")[0]
            ans = _clean_phrase(line)
            if ans:
                return ans, "answer phrase"
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1], "last number"
    return None, "none"


def extract_answer(text: str | None) -> str | None:
    """The final answer in a model's output (see the module docstring for the order of fallbacks)."""
    return extract_answer_with_source(text)[0]


# ------------------------------------------------------------------------------------------ normalisation

_UNIT_WORDS = (
    "units", "unit", "square units", "sq units", "degrees", "degree", "cm", "m", "km", "mm", "inches", "inch",
    "feet", "foot", "ft", "yards", "miles", "mph", "meters", "centimeters", "dollars", "cents", "hours", "hour",
    "minutes", "seconds", "days", "years", "pounds", "ounces", "gallons", "liters", "students", "people",
)
_TEXT_CMD = r"\\(?:text|textbf|mbox|mathrm|textrm|mathbf)\s*"


def _remove_units(s: str) -> str:
    """Drop a trailing `\\text{ unit}` (or a bare unit word after a number); keep `\\text{}` that is the answer."""
    unit = re.match(rf"^(.*\S)\s*{_TEXT_CMD}\{{\s*[A-Za-z][A-Za-z ]*\}}(\^?\{{?\d\}}?)?$", s)
    if unit and re.search(r"[\d}]$", unit.group(1)):
        s = unit.group(1)
    words = "|".join(sorted((re.escape(w) for w in _UNIT_WORDS), key=len, reverse=True))
    bare = re.match(rf"^([-\d.,/\\{{}}a-z]*\d[}}]*)\s+(?:{words})(?:\^?\{{?\d\}}?)?$", s)
    if bare:
        s = bare.group(1)
    return s


def _unwrap_text(s: str) -> str:
    """`\\text{Evelyn}` -> `Evelyn`: the remaining \\text-like wrappers carry the answer itself."""
    while True:
        match = re.search(rf"{_TEXT_CMD}\{{", s)
        if not match:
            return s
        group = _braced(s, match.end() - 1)
        if group is None:
            return s
        s = s[:match.start()] + group[0] + s[group[1]:]


def _fix_frac_shorthand(s: str) -> str:
    """`\\frac12` -> `\\frac{1}{2}`, `\\frac1{2}` -> `\\frac{1}{2}`, `\\sqrt3` -> `\\sqrt{3}`."""
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*([0-9a-zA-Z])", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*([0-9a-zA-Z])\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*(\{[^{}]*\})\s*([0-9a-zA-Z])", r"\\frac\1{\2}", s)
    s = re.sub(r"\\sqrt\s*([0-9a-zA-Z])", r"\\sqrt{\1}", s)
    return s


def _canonical(s: str) -> str:
    """Everything `normalize` does except removing the spaces (the parser needs them between commands)."""
    s = str(s).strip().replace("\n", " ")
    s = re.sub(r",\\!\s*", ",", s)  # 10,\!080: LaTeX's thousands separator
    s = s.replace("\\!", "")
    s = s.replace("\\\\", "\x00")  # a matrix row break; kept apart from "\ " (a space) until the end
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\s*\\?([(\[{|.])", r"\1", s)
    s = re.sub(r"\\right\s*\\?([)\]}|.])", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\[,;: ]", " ", s)  # thin spaces
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = s.replace("\\%", "").replace("%", "")
    s = _remove_units(s.strip())
    s = _unwrap_text(s)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", s):  # 1,000 -> 1000 (only a lone number: tuples keep commas)
        s = s.replace(",", "")
    s = re.sub(r"(?<![\d.])(\d+)\.0+(?![\d])", r"\1", s)  # 5.00 -> 5
    s = re.sub(r"(^|[\s{(\[,=+\-])\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5
    # "x = 5" / "k=5" -> "5": a short left side names the unknown (the MATH paper's rule)
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        s = parts[1].strip()
    s = _fix_frac_shorthand(s)
    if re.fullmatch(r"-?\d+\s*/\s*\d+", s):  # 3/4 -> \frac{3}{4}
        num, den = (p.strip() for p in s.split("/"))
        sign = "-" if num.startswith("-") else ""
        s = f"{sign}\\frac{{{num.lstrip('-')}}}{{{den}}}"
    if s == "0.5":
        s = "\\frac{1}{2}"
    return s.replace("\x00", "\\\\").strip()


def normalize(s: str | None) -> str:
    """MATH-paper style string normalisation of a final answer, for an exact string comparison.

    `\\dfrac`/`\\tfrac` -> `\\frac`; `\\left`/`\\right`, `\\!`, thin spaces, `^\\circ`/`^{\\circ}`, `$`, `\\%`, `%`
    dropped; a trailing `\\text{ unit}` or bare unit word after a number dropped, other `\\text{X}` unwrapped;
    trailing `.0`/`.00` dropped; `.5` -> `0.5`; `1,000` -> `1000`; `x = 5` -> `5` (left side up to 2 chars);
    `\\frac12` -> `\\frac{1}{2}`, `\\sqrt3` -> `\\sqrt{3}`, `a/b` -> `\\frac{a}{b}`, `0.5` -> `\\frac{1}{2}`;
    all spaces removed.
    """
    if s is None:
        return ""
    return re.sub(r"\s+", "", _canonical(s))


# ------------------------------------------------------------------------------- LaTeX -> sympy (worker side)


class _ParseError(ValueError):
    pass


_TOKEN = re.compile(r"\s*(\\[A-Za-z]+|\\[{}]|\d+\.\d*|\d*\.\d+|\d+|[A-Za-z]|[-+*/^_(){}\[\],!|])")
_GREEK = {"alpha", "beta", "gamma", "delta", "theta", "phi", "lambda", "mu", "omega", "sigma", "tau", "rho",
          "epsilon", "varepsilon", "psi", "eta", "zeta", "xi", "nu", "kappa", "chi", "varphi", "vartheta"}
_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "ln", "log", "exp", "arcsin", "arccos", "arctan"}


def _tokenize(s: str) -> list[str]:
    tokens, pos = [], 0
    s = s.strip()
    while pos < len(s):
        match = _TOKEN.match(s, pos)
        if not match:
            raise _ParseError(f"unexpected {s[pos:pos + 10]!r}")
        tokens.append(match.group(1))
        pos = match.end()
        while pos < len(s) and s[pos].isspace():
            pos += 1
    return tokens


class _Parser:
    """Recursive descent over simple LaTeX: + - * / \\cdot \\times \\div ^ _ ! \\frac \\sqrt[n] \\pi \\infty,
    numbers, one-letter and Greek variables, functions, implicit multiplication, () {} [] grouping."""

    def __init__(self, text: str):
        import sympy

        self.sp = sympy
        self.tokens = _tokenize(text)
        self.pos = 0

    def peek(self) -> str | None:
        return self.tokens[self.pos] if self.pos < len(self.tokens) else None

    def take(self, expected: str | None = None) -> str:
        tok = self.peek()
        if tok is None or (expected is not None and tok != expected):
            raise _ParseError(f"expected {expected or 'a token'}, got {tok!r}")
        self.pos += 1
        return tok

    def parse(self):
        expr = self.expr()
        if self.peek() is not None:
            raise _ParseError(f"trailing {self.peek()!r}")
        return expr

    def expr(self):
        value = self.term()
        while self.peek() in ("+", "-"):
            op = self.take()
            rhs = self.term()
            value = value + rhs if op == "+" else value - rhs
        return value

    def _starts_primary(self, tok: str | None) -> bool:
        if tok is None:
            return False
        if tok in ("(", "{") or tok[0].isdigit() or tok[0] == "." or tok.isalpha():
            return True
        return tok.startswith("\\") and tok[1:] in ({"frac", "sqrt", "pi", "infty"} | _GREEK | _FUNCS)

    def term(self):
        value = self.unary()
        while True:
            tok = self.peek()
            if tok in ("*", "\\cdot", "\\times"):
                self.take()
                value = value * self.unary()
            elif tok in ("/", "\\div"):
                self.take()
                value = value / self.unary()
            elif self._starts_primary(tok):
                value = value * self.power()
            else:
                return value

    def unary(self):
        if self.peek() == "-":
            self.take()
            return -self.unary()
        if self.peek() == "+":
            self.take()
            return self.unary()
        return self.power()

    def power(self):
        base = self.postfix()
        if self.peek() == "^":
            self.take()
            exponent = self.group_or_atom(allow_sign=True)
            return self.sp.Pow(base, exponent)
        return base

    def postfix(self):
        value = self.primary()
        while self.peek() == "!":
            self.take()
            value = self.sp.factorial(value)
        return value

    def group_or_atom(self, allow_sign: bool = False):
        """A `{...}` group or one token: `^2`, `^x`, `\\frac12` style arguments."""
        tok = self.peek()
        if tok == "{":
            self.take()
            value = self.expr()
            self.take("}")
            return value
        if allow_sign and tok == "-":
            self.take()
            return -self.group_or_atom()
        if tok is not None and tok[0].isdigit() and len(tok) > 1 and "." not in tok:
            # "^23" in LaTeX is ^2 followed by 3: split the digit run
            self.tokens[self.pos:self.pos + 1] = [tok[0], tok[1:]]
        return self.primary()

    def primary(self):
        sp = self.sp
        tok = self.take()
        if tok[0].isdigit() or tok[0] == ".":
            return sp.Rational(tok) if "." in tok else sp.Integer(tok)
        if tok in ("(", "{", "["):
            close = {"(": ")", "{": "}", "[": "]"}[tok]
            value = self.expr()
            self.take(close)
            return value
        if tok == "|":
            value = self.expr()
            self.take("|")
            return sp.Abs(value)
        if tok.isalpha():
            name = tok
            if self.peek() == "_":
                self.take()
                sub = self.take()
                if sub == "{":
                    sub = "".join(self._until("}"))
                name = f"{name}_{sub}"
            return sp.Symbol(name)
        if tok.startswith("\\"):
            return self.command(tok[1:])
        raise _ParseError(f"unexpected {tok!r}")

    def _until(self, close: str) -> list[str]:
        out = []
        while self.peek() != close:
            out.append(self.take())
        self.take(close)
        return out

    def command(self, name: str):
        sp = self.sp
        if name == "frac":
            num = self.group_or_atom()
            den = self.group_or_atom()
            return num / den
        if name == "sqrt":
            if self.peek() == "[":
                self.take()
                index = self.expr()
                self.take("]")
                return sp.root(self.group_or_atom(), index)
            return sp.sqrt(self.group_or_atom())
        if name == "pi":
            return sp.pi
        if name == "infty":
            return sp.oo
        if name in _GREEK:
            return sp.Symbol(name)
        if name in _FUNCS:
            func = {"ln": sp.log, "log": sp.log, "arcsin": sp.asin, "arccos": sp.acos, "arctan": sp.atan}.get(
                name, getattr(sp, name, None))
            return func(self.power())
        raise _ParseError(f"unsupported command \\{name}")


def _split_top(s: str) -> list[str]:
    """Split on commas that are not inside (), [], {}."""
    parts, depth, cur = [], 0, []
    for ch in s:
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def _brackets(s: str) -> tuple[str, str, str] | None:
    """('(', inner, ']') when s is one bracketed group like (a, b] or \\{1, 2\\}."""
    s = s.replace("\\{", "{").replace("\\}", "}")
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        depth = 0
        for i, ch in enumerate(s):
            depth += ch in "([{"
            depth -= ch in ")]}"
            if depth == 0 and i < len(s) - 1:
                return None  # "(1)(2)": the first bracket closes early
        return s[0], s[1:-1], s[-1]
    return None


def _scalar_equal(a: str, b: str) -> bool:
    import sympy

    if re.sub(r"\s+", "", a) == re.sub(r"\s+", "", b):
        return True
    try:
        x, y = _Parser(a).parse(), _Parser(b).parse()
    except (_ParseError, TypeError, ValueError, ZeroDivisionError, AttributeError):
        return False
    if x == y:
        return True
    if x.has(sympy.oo, -sympy.oo, sympy.zoo) or y.has(sympy.oo, -sympy.oo, sympy.zoo):
        return False
    if not x.free_symbols and not y.free_symbols:
        xv, yv = complex(sympy.N(x, 30)), complex(sympy.N(y, 30))
        return abs(xv - yv) <= 1e-9 * max(1.0, abs(xv), abs(yv))
    return sympy.simplify(x - y) == 0


def _equal(a: str, b: str) -> bool:
    """Symbolic/numeric equality of two canonical answers: tuples/intervals element-wise, lists as multisets."""
    ba, bb = _brackets(a), _brackets(b)
    if ba and bb and (len(_split_top(ba[1])) > 1 or len(_split_top(bb[1])) > 1):
        if (ba[0], ba[2]) != (bb[0], bb[2]):
            return False  # (1, 2] is not (1, 2)
        xs, ys = _split_top(ba[1]), _split_top(bb[1])
        if ba[0] == "{":  # a set: order does not matter
            return _multiset_equal(xs, ys)
        return len(xs) == len(ys) and all(_scalar_equal(x, y) for x, y in zip(xs, ys, strict=True))
    xs, ys = _split_top(a), _split_top(b)
    if len(xs) > 1 or len(ys) > 1:  # "2, -3": solutions listed in any order
        return _multiset_equal(xs, ys)
    return _scalar_equal(a, b)


def _multiset_equal(xs: list[str], ys: list[str]) -> bool:
    if len(xs) != len(ys):
        return False
    remaining = list(ys)
    for x in xs:
        hit = next((i for i, y in enumerate(remaining) if _scalar_equal(x, y)), None)
        if hit is None:
            return False
        remaining.pop(hit)
    return True


def _serve() -> None:
    """The worker process's loop: sympy imported once, then one JSON line [a, b] in, one line true/false out."""
    import json
    import sys

    import sympy  # noqa: F401  (imported before "ready" so the first comparison's time limit is fair)

    print("ready", flush=True)
    for line in sys.stdin:
        try:
            a, b = json.loads(line)
            result = bool(_equal(a, b))
        except Exception:  # any sympy failure on odd input means "not shown equal"
            result = False
        print("true" if result else "false", flush=True)


class _SympyWorker:
    """One long-lived process for the sympy comparisons; killed and restarted when a comparison overruns.

    A plain `python -c` subprocess rather than multiprocessing: no re-import of the caller's __main__, no fork of
    a process that may hold threads or CUDA state.
    """

    START_TIMEOUT_S = 60.0

    def __init__(self):
        self._lock = threading.Lock()
        self._proc: subprocess.Popen | None = None

    def _readline(self, timeout_s: float) -> str | None:
        ready, _, _ = select.select([self._proc.stdout], [], [], timeout_s)
        return self._proc.stdout.readline().strip() if ready else None

    def _start(self) -> bool:
        scripts = str(SCRIPTS_DIR)
        env = {**os.environ, "PYTHONPATH": scripts + os.pathsep + os.environ.get("PYTHONPATH", "")}
        self._proc = subprocess.Popen([sys.executable, "-c", "from cogumi.evaluate.judge_math import _serve; _serve()"],
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                      text=True, env=env, bufsize=1)
        if self._readline(self.START_TIMEOUT_S) != "ready":
            log.warning("the sympy judge worker did not start in %.0f s; symbolic comparison is off for this call",
                        self.START_TIMEOUT_S)
            self._stop()
            return False
        return True

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
            for pipe in (self._proc.stdin, self._proc.stdout):
                try:
                    pipe.close()
                except OSError:
                    pass
        self._proc = None

    def compare(self, a: str, b: str, timeout_s: float) -> bool | None:
        """True/False, or None when the comparison ran past timeout_s (the worker is killed; the next call
        starts a fresh one)."""
        with self._lock:
            if self._proc is None or self._proc.poll() is not None:
                self._stop()
                if not self._start():
                    return None
            try:
                self._proc.stdin.write(json.dumps([a, b]) + "\n")
                self._proc.stdin.flush()
                answer = self._readline(timeout_s)
            except (OSError, ValueError):
                answer = None
            if answer in ("true", "false"):
                return answer == "true"
            self._stop()
            return None

    def close(self) -> None:
        with self._lock:
            self._stop()


_WORKER = _SympyWorker()


def is_equiv(pred: str | None, gold: str | None, timeout_s: float = 2.0) -> bool:
    """True when `pred` and `gold` are the same answer: equal after `normalize`, else equal as sympy expressions
    (numbers, fractions, roots, pi, polynomials; tuples/intervals element-wise), decided within `timeout_s`
    seconds of sympy time; a comparison that runs longer counts as unequal."""
    if pred is None or gold is None:
        return False
    a, b = normalize(pred), normalize(gold)
    if not a or not b:
        return False
    if a == b:
        return True
    result = _WORKER.compare(_canonical(pred), _canonical(gold), timeout_s)
    if result is None:
        log.info("sympy comparison of %r and %r ran past %.1f s: judged unequal", pred[:80], gold[:80], timeout_s)
        return False
    return result


def judge_math(output: str | None, gold: str | None, *, timeout_s: float = 2.0) -> Verdict:
    """Judge one model output against the gold final answer. Never raises for odd text."""
    try:
        answer, source = extract_answer_with_source(output)
        if answer is None:
            return Verdict(False, "no answer", None)
        ok = is_equiv(answer, gold, timeout_s=timeout_s)
    except Exception as exc:  # a judge bug must not take the benchmark down: record it as a failed verdict
        log.exception("math judge error")
        return Verdict(False, f"judge error: {type(exc).__name__}: {exc}", None)
    via = "" if source == "boxed" else f" (from the {source})"
    return Verdict(ok, ("passed" if ok else "wrong answer") + via, answer)
