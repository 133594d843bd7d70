"""A small LaTeX -> sympy parser for MATH answers (runs in the judge's worker process, never in the caller).

sympy's own LaTeX parser needs antlr, which the locked stack does not ship. Decimals become exact rationals
(`0.1` is 1/10), so equality of numbers is exact; the caller decides where a tolerance is allowed.
"""

from __future__ import annotations

import re


class ParseError(ValueError):
    """The text is not a LaTeX expression this parser reads (garbage, or a stray symbol)."""


class UnsupportedLatex(ParseError):
    """Valid LaTeX this parser does not know: the judge's limit, so a judge_error, never a wrong answer."""


_TOKEN = re.compile(r"\s*(\\[A-Za-z]+|\\[{}]|\d+\.\d*|\d*\.\d+|\d+|[A-Za-z]|[-+*/^_(){}\[\],!|])")
_GREEK = {"alpha", "beta", "gamma", "delta", "theta", "phi", "lambda", "mu", "omega", "sigma", "tau", "rho",
          "epsilon", "varepsilon", "psi", "eta", "zeta", "xi", "nu", "kappa", "chi", "varphi", "vartheta"}
_STARTERS = {"binom", "dbinom", "tbinom", "lfloor", "lceil"}
_FUNCS = {"sin", "cos", "tan", "cot", "sec", "csc", "ln", "log", "exp", "arcsin", "arccos", "arctan"}


def _tokenize(s: str) -> list[str]:
    tokens, pos = [], 0
    s = s.strip()
    while pos < len(s):
        match = _TOKEN.match(s, pos)
        if not match:
            raise ParseError(f"unexpected {s[pos:pos + 10]!r}")
        tokens.append(match.group(1))
        pos = match.end()
        while pos < len(s) and s[pos].isspace():
            pos += 1
    return tokens


class Parser:
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
            raise ParseError(f"expected {expected or 'a token'}, got {tok!r}")
        self.pos += 1
        return tok

    def parse(self):
        expr = self.expr()
        if self.peek() is not None:
            raise ParseError(f"trailing {self.peek()!r}")
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
        return tok.startswith("\\") and tok[1:] in ({"frac", "sqrt", "pi", "infty"} | _STARTERS | _GREEK | _FUNCS)

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
        raise ParseError(f"unexpected {tok!r}")

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
        if name in ("binom", "dbinom", "tbinom"):
            return sp.binomial(self.group_or_atom(), self.group_or_atom())
        if name in ("lfloor", "lceil"):
            inner = self.expr()
            self.take("\\rfloor" if name == "lfloor" else "\\rceil")
            return sp.floor(inner) if name == "lfloor" else sp.ceiling(inner)
        raise UnsupportedLatex(f"unsupported command \\{name}")
