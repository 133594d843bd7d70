"""Symbolic equality of two canonical MATH answers: the judge's worker process (see judge_math for the caller).

Rules, for pred (the model's answer) against gold:
  * numbers are exact: integers and fractions (and decimals, read as exact rationals) are equal only when their
    values are equal; no relative tolerance (1099511627776 is not 1099511627775, 1e-10 is not 0);
  * a rounded decimal gold states its precision: a decimal pred with at least as many places that rounds to it
    is equal (gold 4.67: 4.667 yes, 4.7 no, 14/3 no: the problem asked for a decimal); whether the gold is
    rounded the caller decides from the problem (judge_math.gold_is_rounded); an exact decimal gold (the problem
    asks for no rounding: 2.5 for 5/2) needs the same value (2.54 no, 5/2 yes);
  * exact irrational values (roots, pi, logs) are compared symbolically, then numerically to 1e-12 relative with
    50 digits; a decimal pred never equals an exact irrational gold (3.14 is not pi);
  * tuples and intervals element-wise with their brackets ((1,2] is not (1,2)); `\\{...\\}` sets and bare lists
    ("2, -3", solutions in any order) as multisets, also a set against a bare list; unions of intervals
    (`\\cup`) as sets of intervals;
  * equations: equal when one is a non-zero multiple of the other (`2x+2y=2` and `x+y=1`); an equation never
    equals an expression (the caller already reduced `x = 3` to `3`);
  * symbolic expressions: sympy.simplify(x - y) == 0;
  * `a \\pm b` is the two answers a+b and a-b (also inside a set or list); a pmatrix/bmatrix compares cell by
    cell; a number in a base (`52_8`, `52_{8}`) compares digits and base as text, and a bare `52` against it
    is equal (the problem named the base).
`compare` returns True/False, or raises ParseError/UnsupportedLatex (the caller turns the latter, and any gold
it cannot read, into a judge_error).
"""

from __future__ import annotations

import re

from cogumi.judge.math_parse import Parser


def split_top(s: str, sep: str = ",") -> list[str]:
    """Split on `sep` where it is not inside (), [], {}."""
    parts, depth, cur, i = [], 0, [], 0
    while i < len(s):
        ch = s[i]
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        if depth == 0 and s.startswith(sep, i):
            parts.append("".join(cur))
            cur = []
            i += len(sep)
            continue
        cur.append(ch)
        i += 1
    parts.append("".join(cur))
    return [p.strip() for p in parts]


def brackets(s: str) -> tuple[str, str, str] | None:
    """('(', inner, ']') when s is one bracketed group like (a, b] or \\{1, 2\\}."""
    s = s.strip().replace("\\{", "{").replace("\\}", "}")
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        depth = 0
        for i, ch in enumerate(s):
            depth += ch in "([{"
            depth -= ch in ")]}"
            if depth == 0 and i < len(s) - 1:
                return None  # "(1)(2)": the first bracket closes early
        return s[0], s[1:-1], s[-1]
    return None


_DECIMAL = re.compile(r"-?\d*\.\d+")


def _places(s: str) -> int:
    return len(s.split(".")[1])


def _scalar_equal(pred: str, gold: str, rounded: bool) -> bool:
    import sympy

    if re.sub(r"\s+", "", pred) == re.sub(r"\s+", "", gold):
        return True
    if "=" in pred or "=" in gold:
        return _equation_equal(pred, gold)
    x, y = Parser(pred).parse(), Parser(gold).parse()
    if x == y:
        return True
    pred_decimal, gold_decimal = _DECIMAL.fullmatch(pred.strip()), _DECIMAL.fullmatch(gold.strip())
    if x.is_Rational and y.is_Rational:
        if rounded and pred_decimal and gold_decimal and _places(pred) >= _places(gold):
            step = sympy.Rational(1, 10 ** _places(gold))
            return abs(x - y) <= step / 2  # 4.667 rounds to the gold's 4.67
        return False  # exact numbers: equal values only (x == y above)
    if x.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan) or y.has(sympy.oo, -sympy.oo, sympy.zoo, sympy.nan):
        return False
    if re.search(r"\d\.\d", pred) and not re.search(r"\d\.\d", gold):
        return False  # a decimal approximation of an exact irrational gold is not the answer
    if not x.free_symbols and not y.free_symbols:
        if sympy.simplify(x - y) == 0:
            return True
        xv, yv = complex(sympy.N(x, 50)), complex(sympy.N(y, 50))
        return abs(xv - yv) <= 1e-12 * max(abs(xv), abs(yv)) and abs(yv) > 0
    return sympy.simplify(x - y) == 0


def _equation_equal(pred: str, gold: str) -> bool:
    import sympy

    sides_p, sides_g = split_top(pred, "="), split_top(gold, "=")
    if len(sides_p) != 2 or len(sides_g) != 2:
        return False  # an equation against an expression, or chained equations
    p = Parser(sides_p[0]).parse() - Parser(sides_p[1]).parse()
    g = Parser(sides_g[0]).parse() - Parser(sides_g[1]).parse()
    if g == 0 or p == 0:
        return p == g
    ratio = sympy.simplify(p / g)
    return bool(ratio.is_number and ratio != 0)


def _multiset_equal(xs: list[str], ys: list[str], rounded: bool) -> bool:
    if len(xs) != len(ys):
        return False
    remaining = list(ys)
    for x in xs:
        hit = next((i for i, y in enumerate(remaining) if equal(x, y, rounded)), None)
        if hit is None:
            return False
        remaining.pop(hit)
    return True


_MATRIX = re.compile(r"\\begin\{([pbv]?matrix)\}(.*)\\end\{\1\}", re.S)
_BASE = re.compile(r"(\w+)_\{?(\w+)\}?")


def _matrix(s: str) -> list[list[str]] | None:
    match = _MATRIX.fullmatch(s.strip())
    if not match:
        return None
    return [[cell.strip() for cell in row.split("&")] for row in match.group(2).split("\\\\") if row.strip()]


def _expand_pm(items: list[str]) -> list[str]:
    out = []
    for item in items:
        parts = split_top(item, "\\pm")
        out += [f"{parts[0]} + ({parts[1]})", f"{parts[0]} - ({parts[1]})"] if len(parts) == 2 else [item]
    return out


def equal(pred: str, gold: str, rounded: bool = True) -> bool:
    """Equality of two canonical answers (see the module docstring); rounded: a decimal gold is a rounded value."""
    mp, mg = _matrix(pred), _matrix(gold)
    if mp is not None or mg is not None:
        if mp is None or mg is None or [len(r) for r in mp] != [len(r) for r in mg]:
            return False
        return all(equal(a, b, rounded) for ra, rb in zip(mp, mg, strict=True) for a, b in zip(ra, rb, strict=True))
    bp_, bg_ = _BASE.fullmatch(pred.strip()), _BASE.fullmatch(gold.strip())
    if bg_ and bg_.group(1).isalnum() and not bg_.group(1).isalpha():
        digits = bp_.groups() if bp_ else (pred.strip(), bg_.group(2))
        return digits == bg_.groups()
    if "\\pm" in pred or "\\pm" in gold:
        inner_p, inner_g = brackets(pred), brackets(gold)
        xs = _expand_pm(split_top(inner_p[1] if inner_p else pred))
        ys = _expand_pm(split_top(inner_g[1] if inner_g else gold))
        return _multiset_equal(xs, ys, rounded)
    up, ug = split_top(pred, "\\cup"), split_top(gold, "\\cup")
    if len(up) > 1 or len(ug) > 1:
        return _multiset_equal(up, ug, rounded)
    bp, bg = brackets(pred), brackets(gold)
    if bp and bg and (len(split_top(bp[1])) > 1 or len(split_top(bg[1])) > 1):
        if (bp[0], bp[2]) != (bg[0], bg[2]):
            return False  # (1, 2] is not (1, 2)
        xs, ys = split_top(bp[1]), split_top(bg[1])
        if bp[0] == "{":  # a set: order does not matter
            return _multiset_equal(xs, ys, rounded)
        return len(xs) == len(ys) and all(equal(x, y, rounded) for x, y in zip(xs, ys, strict=True))
    if bp and bg and bp[0] == "{" and bg[0] == "{":  # {5} vs {5}: one-element sets
        return (bp[0], bp[2]) == (bg[0], bg[2]) and equal(bp[1], bg[1], rounded)
    # a set of solutions against the same solutions listed bare ("\{3, 5\}" vs "3, 5"): both are multisets
    xs = split_top(bp[1]) if bp and bp[0] == "{" and not bg else split_top(pred)
    ys = split_top(bg[1]) if bg and bg[0] == "{" and not bp else split_top(gold)
    if len(xs) > 1 or len(ys) > 1:  # "2, -3": solutions listed in any order
        return _multiset_equal(xs, ys, rounded)
    return _scalar_equal(xs[0], ys[0], rounded)


def serve() -> None:
    """The worker's loop: sympy imported once, then one JSON line [pred, gold] in, one JSON line out:
    {"equal": bool} or {"error": "<cause>"} (a parse failure names which side and why). A third item, when
    there, says whether a decimal gold is rounded (default True)."""
    import json
    import sys

    import sympy  # noqa: F401  (imported before "ready" so the first comparison's time limit is fair)

    from cogumi.judge.math_parse import ParseError, UnsupportedLatex

    print("ready", flush=True)
    for line in sys.stdin:
        pred, gold, *flags = json.loads(line)
        try:
            reply = {"equal": bool(equal(pred, gold, rounded=flags[0] if flags else True))}
        except UnsupportedLatex as exc:
            reply = {"error": f"parser: {exc}"}
        except ParseError as exc:
            try:  # the judge cannot read the gold: its fault; an unreadable pred is just not the answer
                Parser(gold).parse() if not brackets(gold) and "," not in gold and "=" not in gold else None
                reply = {"equal": False, "note": f"unreadable answer: {exc}"}
            except ParseError as gold_exc:
                reply = {"error": f"parser cannot read the gold: {gold_exc}"}
        except Exception as exc:  # a sympy failure on odd input is the judge's failure, not a wrong answer
            reply = {"error": f"sympy: {type(exc).__name__}: {exc}"[:300]}
        print(json.dumps(reply), flush=True)
