"""String normalisation of MATH final answers, before any symbolic comparison (the parent process side).

`canonical` keeps the spaces the LaTeX parser needs; `normalize` is `canonical` with every space removed, for an
exact string comparison (the MATH paper's rule). What they do, in order:
  * `\\dfrac`/`\\tfrac` -> `\\frac`; `\\left`/`\\right`, `\\!`, thin spaces, `\\displaystyle`, `^\\circ`, `$` dropped;
  * thousands separators in a lone number: `1,000`, `1{,}000`, `1,\\!000`, `1\\,000` -> `1000`;
  * `%`/`\\%` dropped (`is_percent` says whether it was there: the judge compares percent-ness itself);
  * a trailing `\\text{ unit}` or bare unit word after a number (or `\\pi`) dropped, also words outside the
    unit list (`5 marbles`), other `\\text{X}` unwrapped; a leading `\\approx` dropped;
  * `6.72e-5` -> `6.72 \\times 10^{-5}`; `x \\in (1, 2]` -> `(1, 2]`; `(a, b) = (1, 2)` -> `(1, 2)`;
    `x = 3, x = 5` -> `3, 5`; an inequality in one variable -> its interval (`x \\ge 2` -> `[2, \\infty)`);
  * `5.00` -> `5`, `.5` -> `0.5`; `x = 5` -> `5` (left side up to 2 characters, the MATH paper's rule);
  * `\\frac12` -> `\\frac{1}{2}`, `\\sqrt3` -> `\\sqrt{3}`, `a/b` -> `\\frac{a}{b}`;
  * mixed numbers `2\\frac{1}{4}` -> `\\frac{9}{4}` (an integer then a proper fraction of integers: in a final
    answer that is a mixed number, never a product; ISSUES_LOG B10);
  * repeating decimals `0.\\overline{3}`, `0.1\\overline{6}`, `1.\\overline{27}` -> the exact fraction.
"""

from __future__ import annotations

import re
from fractions import Fraction

from cogumi.judge.math_extract import braced

_UNIT_WORDS = (
    "units", "unit", "square units", "sq units", "degrees", "degree", "cm", "m", "km", "mm", "inches", "inch",
    "feet", "foot", "ft", "yards", "miles", "mph", "meters", "centimeters", "dollars", "cents", "hours", "hour",
    "minutes", "seconds", "days", "years", "pounds", "ounces", "gallons", "liters", "students", "people",
)
_TEXT_CMD = r"\\(?:text|textbf|mbox|mathrm|textrm|mathbf|textit|mathit)\s*"
_UNIT_PATTERN = "|".join(sorted((re.escape(w) for w in _UNIT_WORDS), key=len, reverse=True))


# Words after a number that are mathematics, not a unit: "3 pi" is 3*pi
_MATH_WORDS = {"pi", "sin", "cos", "tan", "cot", "sec", "csc", "log", "ln", "exp", "sqrt", "and", "or", "to"}


def _remove_units(s: str) -> str:
    """Drop a trailing `\\text{ unit}` (or a bare unit word after a number); keep `\\text{}` that is the answer.

    A unit is one of _UNIT_WORDS or any run of words of 3+ letters after a number (`5 apples`, `12\\pi \\text{
    cubic units}`, `3 marbles`): a final answer's trailing words name what was counted."""
    unit = re.match(rf"^(.*\S)\s*{_TEXT_CMD}\{{\s*[A-Za-z][A-Za-z ]*\}}(\^?\{{?\d\}}?)?$", s)
    if unit and re.search(r"[\d}]$|\\pi$", unit.group(1)):
        s = unit.group(1)
    number = r"[-\d.,/\\{}a-z]*(?:\d[}]*|\\pi)"
    bare = re.match(rf"^({number})\s+(?:{_UNIT_PATTERN})(?:\^?\{{?\d\}}?)?$", s)
    if bare:
        return bare.group(1)
    words = re.match(rf"^({number})\s+([A-Za-z]{{3,}}(?:[ -][A-Za-z]+)*)(?:\^?\{{?\d\}}?)?$", s)
    if words and not _MATH_WORDS & set(words.group(2).lower().replace("-", " ").split()):
        return words.group(1)
    return s


def unwrap_text(s: str) -> str:
    """`\\text{Evelyn}` -> `Evelyn`: the remaining \\text-like wrappers carry the answer itself."""
    while True:
        match = re.search(rf"{_TEXT_CMD}\{{", s)
        if not match:
            return s
        group = braced(s, match.end() - 1)
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


def _fraction_latex(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    sign = "-" if value < 0 else ""
    return f"{sign}\\frac{{{abs(value.numerator)}}}{{{value.denominator}}}"


def _mixed_number(s: str) -> str:
    match = re.fullmatch(r"(-?)\s*(\d+)\s*\\frac\{(\d+)\}\{(\d+)\}", s)
    if not match:
        return s
    sign, whole, num, den = match.group(1), int(match.group(2)), int(match.group(3)), int(match.group(4))
    if den == 0 or num >= den:  # 2\frac{3}{2} is not a mixed number: leave it a product
        return s
    value = whole + Fraction(num, den)
    return _fraction_latex(-value if sign else value)


def _repeating_decimal(s: str) -> str:
    match = re.fullmatch(r"(-?)(\d*)\.(\d*)\s*\\overline\s*\{?\s*(\d+)\s*\}?", s)
    if not match:
        return s
    sign, whole, fixed, period = match.groups()
    value = Fraction(int(whole or "0")) + Fraction(int(fixed or "0"), 10 ** len(fixed))
    value += Fraction(int(period), 10 ** len(fixed) * (10 ** len(period) - 1))
    return _fraction_latex(-value if sign else value)


def is_percent(s: str | None) -> bool:
    """The answer is written as a percentage (`45\\%`, `45%`, `45 percent`)."""
    return bool(s) and bool(re.search(r"%|\\text\{\s*percent\s*\}|\bpercent\b", s))


_LESS, _GREATER, _CLOSED = ("<", "\\leq"), (">", "\\geq"), ("\\leq", "\\geq")
_RELATION = re.compile(r"(\\leq|\\geq|<|>)")
_VARIABLE = re.compile(r"[a-z]")


def _interval(low: str, high: str, closed_low: bool, closed_high: bool) -> str:
    return ("[" if closed_low else "(") + f"{low}, {high}" + ("]" if closed_high else ")")


def _inequality_interval(s: str) -> str:
    """`x > 2` -> `(2, \\infty)`, `x \\le -1` -> `(-\\infty, -1]`, `1 < x \\leq 3` -> `(1, 3]`: an inequality in one
    variable is the interval of its solutions, so it compares with an interval answer (and the parser reads it)."""
    s = re.sub(r"\\geqslant|\\geq|\\ge(?![a-z])|>=|≥", r"\\geq", s)
    s = re.sub(r"\\leqslant|\\leq|\\le(?![a-z])|<=|≤", r"\\leq", s)
    parts = [p.strip() for p in _RELATION.split(s)]
    if len(parts) == 3:
        left, rel, right = parts
        if bool(_VARIABLE.fullmatch(left)) == bool(_VARIABLE.fullmatch(right)):
            return s  # no variable side, or two letters: not one variable against a bound
        var_left = bool(_VARIABLE.fullmatch(left))
        bound = right if var_left else left
        if not bound or "=" in bound:
            return s
        if (rel in _GREATER) == var_left:  # x > 2 and 2 < x: the solutions lie above the bound
            return _interval(bound, "\\infty", rel in _CLOSED, False)
        return _interval("-\\infty", bound, False, rel in _CLOSED)
    if len(parts) == 5 and _VARIABLE.fullmatch(parts[2]) and parts[0] and parts[4]:
        low, rel_low, _, rel_high, high = parts
        if rel_low in _GREATER and rel_high in _GREATER:  # 3 > x > 1 is 1 < x < 3
            low, rel_low, high, rel_high = high, rel_high, low, rel_low
        if rel_low in _LESS and rel_high in _LESS:
            return _interval(low, high, rel_low in _CLOSED, rel_high in _CLOSED)
    return s


def _solution_list(s: str) -> str:
    """`x \\in (1, 2]` -> `(1, 2]`; `(a, b, c) = (1, 2, 3)` -> `(1, 2, 3)`; `x = 3, x = 5` / `x = 3 or x = 5` ->
    `3, 5`: the names of the unknowns are not part of the answer."""
    s = re.sub(r"^[a-z]\s*\\in\s*", "", s)
    tuple_named = re.fullmatch(r"\(\s*[a-z](?:\s*,\s*[a-z])+\s*\)\s*=\s*(.+)", s)
    if tuple_named:
        return tuple_named.group(1)
    items = re.split(r"\s*,\s*|\s+(?:\\text\{\s*)?(?:or|and)(?:\s*\})?\s+", s)
    named = [re.fullmatch(r"([a-z])\s*=\s*([^=]+)", item) for item in items]
    if len(items) > 1 and all(named) and len({m.group(1) for m in named}) == 1:
        return ", ".join(m.group(2).strip() for m in named)
    return s


def _scientific(s: str) -> str:
    """`6.72e-5` / `6.72E-05` -> `6.72 \\times 10^{-5}` (the parser's form of the same exact number)."""
    return re.sub(r"(?<![\w.\\])(\d+(?:\.\d+)?)[eE]([-+]?\d+)(?![\w.])", r"\1 \\times 10^{\2}", s)


def canonical(s: str) -> str:
    """Everything `normalize` does except removing the spaces (the parser needs them between commands)."""
    s = str(s).strip().replace("\n", " ")
    s = re.sub(r"(?<=\d)\{,\}(?=\d{3})", ",", s)  # 1{,}000
    s = re.sub(r",\\!\s*", ",", s)  # 10,\!080: LaTeX's thousands separator
    s = s.replace("\\!", "")
    s = s.replace("\\\\", "\x00")  # a matrix row break; kept apart from "\ " (a space) until the end
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = re.sub(r"\\left\s*\\?([(\[{|.])", r"\1", s)
    s = re.sub(r"\\right\s*\\?([)\]}|.])", r"\1", s)
    s = s.replace("\\left", "").replace("\\right", "")
    s = s.replace("\\displaystyle", "")
    s = re.sub(r"\\[,;: ]", " ", s)  # thin spaces
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree", "", s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\%|%|\s*\\text\{\s*percent\s*\}|\s+percent$", "", s)
    s = _remove_units(s.strip())
    s = unwrap_text(s)
    s = s.strip().rstrip(".").strip()
    if re.fullmatch(r"-?\d{1,3}(?:[, ]\d{3})+(?:\.\d+)?", s):  # 1,000 -> 1000 (a lone number: tuples keep commas)
        s = s.replace(",", "").replace(" ", "")
    s = re.sub(r"^(?:\\approx|≈)\s*", "", s)  # a gold "\approx 2.5" is 2.5, rounded (judge_math.gold_is_rounded)
    s = _scientific(s)
    s = _solution_list(s)
    s = _inequality_interval(s)
    s = re.sub(r"(?<![\d.])(\d+)\.0+(?![\d\\])", r"\1", s)  # 5.00 -> 5
    s = re.sub(r"(^|[\s{(\[,=+\-])\.(\d)", r"\g<1>0.\2", s)  # .5 -> 0.5
    # "x = 5" / "k=5" -> "5": a short left side names the unknown (the MATH paper's rule)
    parts = s.split("=")
    if len(parts) == 2 and len(parts[0].strip()) <= 2:
        s = parts[1].strip()
    s = _fix_frac_shorthand(s)
    s = _mixed_number(s)
    s = _repeating_decimal(s)
    if re.fullmatch(r"-?\d+\s*/\s*\d+", s):  # 3/4 -> \frac{3}{4}
        num, den = (p.strip() for p in s.split("/"))
        sign = "-" if num.startswith("-") else ""
        s = f"{sign}\\frac{{{num.lstrip('-')}}}{{{den}}}"
    if s == "0.5":
        s = "\\frac{1}{2}"
    return s.replace("\x00", "\\\\").strip()


def normalize(s: str | None) -> str:
    """MATH-paper style string normalisation of a final answer (see the module docstring); no spaces."""
    if s is None:
        return ""
    return re.sub(r"\s+", "", canonical(s))





def choice_letter(s: str | None) -> str | None:
    """`(C)`, `C`, `\\text{(C)}`, `\\textbf{(C) } 12` -> `C`: a multiple-choice letter, else None."""
    if not s:
        return None
    text = unwrap_text(s).replace("$", "").strip()
    match = re.fullmatch(r"\(?\s*([A-E])\s*\)?", text) or re.match(r"\(\s*([A-E])\s*\)", text)
    return match.group(1) if match else None


def word_answer(s: str) -> str | None:
    """A text answer as lower-case words (`\\text{East }` -> `east`); None when it is math, not words.

    Words are compared as words: sympy would read `east` as e*a*s*t, equal to `seat` (ISSUES_LOG B10).
    """
    text = unwrap_text(s.replace("\\ ", " ")).replace("$", "").strip().rstrip(".")
    if not re.fullmatch(r"[A-Za-z][A-Za-z ,'\-]*", text) or not re.search(r"[A-Za-z]{2,}", text):
        return None
    return " ".join(re.sub(r"[,'\-]", " ", text).lower().split())
