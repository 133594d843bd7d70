"""String normalisation of MATH final answers, before any symbolic comparison (the parent process side).

`canonical` keeps the spaces the LaTeX parser needs; `normalize` is `canonical` with every space removed, for an
exact string comparison (the MATH paper's rule). What they do, in order:
  * `\\dfrac`/`\\tfrac` -> `\\frac`; `\\left`/`\\right`, `\\!`, thin spaces, `\\displaystyle`, `^\\circ`, `$` dropped;
  * thousands separators in a lone number: `1,000`, `1{,}000`, `1,\\!000`, `1\\,000` -> `1000`;
  * `%`/`\\%` dropped (`is_percent` says whether it was there: the judge compares percent-ness itself);
  * a trailing `\\text{ unit}` or bare unit word after a number dropped, other `\\text{X}` unwrapped;
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


def _remove_units(s: str) -> str:
    """Drop a trailing `\\text{ unit}` (or a bare unit word after a number); keep `\\text{}` that is the answer."""
    unit = re.match(rf"^(.*\S)\s*{_TEXT_CMD}\{{\s*[A-Za-z][A-Za-z ]*\}}(\^?\{{?\d\}}?)?$", s)
    if unit and re.search(r"[\d}]$", unit.group(1)):
        s = unit.group(1)
    bare = re.match(rf"^([-\d.,/\\{{}}a-z]*\d[}}]*)\s+(?:{_UNIT_PATTERN})(?:\^?\{{?\d\}}?)?$", s)
    if bare:
        s = bare.group(1)
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
