"""Safe size expressions, zram-generator style: ``"min(ram / 2, 4096)"``.

Theory of operation
-------------------
A tiny tokenizer plus a recursive-descent parser/evaluator for arithmetic over
numbers and named variables (``ram``, in MiB, as zram-generator uses). It never
calls ``eval``: the only things an expression can do are + - * / %, unary minus
and plus, parentheses, ``min(...)`` and ``max(...)`` with one or more arguments.

Grammar::

    expr    := term (('+' | '-') term)*
    term    := unary (('*' | '/' | '%') unary)*
    unary   := ('-' | '+') unary | primary
    primary := NUMBER | NAME | FUNC '(' expr (',' expr)* ')' | '(' expr ')'

Values are floats (``/`` is true division, as in zram-generator's fasteval);
callers round the result. Errors are SizeExprError carrying the 0-based column,
and the message shows it. Limits: expression length and nesting depth are capped
so a hostile config cannot exhaust the stack.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

MAX_EXPR_LEN = 1024
MAX_DEPTH = 64

FUNCTIONS: dict[str, Callable[..., float]] = {"min": min, "max": max}

_TOKEN_RE = re.compile(
    r"\s*(?:(?P<num>(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<op>[-+*/%(),]))"
)


class SizeExprError(ValueError):
    """A bad expression; ``pos`` is the 0-based column of the offending token."""

    def __init__(self, message: str, expr: str, pos: int) -> None:
        self.expr = expr
        self.pos = pos
        self.reason = message
        super().__init__(f"{message} at column {pos + 1} in {expr!r}")


@dataclass(frozen=True)
class _Tok:
    kind: str  # "num", "name", "op", "end"
    text: str
    pos: int


def _tokenize(expr: str) -> list[_Tok]:
    toks: list[_Tok] = []
    i = 0
    n = len(expr)
    while i < n:
        if expr[i:].strip() == "":
            break
        m = _TOKEN_RE.match(expr, i)
        if m is None or m.end() == i:
            j = i
            while j < n and expr[j].isspace():
                j += 1
            raise SizeExprError(f"unexpected character {expr[j]!r}", expr, j)
        kind = m.lastgroup or "op"
        toks.append(_Tok(kind, m.group(kind), m.start(kind)))
        i = m.end()
    toks.append(_Tok("end", "", len(expr)))
    return toks


class _Parser:
    def __init__(self, expr: str, variables: Mapping[str, float]) -> None:
        self.expr = expr
        self.vars = variables
        self.toks = _tokenize(expr)
        self.i = 0
        self.depth = 0

    def peek(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        t = self.toks[self.i]
        self.i += 1
        return t

    def error(self, msg: str, tok: _Tok | None = None) -> SizeExprError:
        t = tok or self.peek()
        return SizeExprError(msg, self.expr, t.pos)

    def expect(self, text: str) -> None:
        t = self.peek()
        if t.kind != "op" or t.text != text:
            got = "end of expression" if t.kind == "end" else repr(t.text)
            raise self.error(f"expected {text!r}, got {got}")
        self.take()

    def parse(self) -> float:
        if not self.expr.strip():
            raise SizeExprError("empty expression", self.expr, 0)
        v = self.expr_()
        t = self.peek()
        if t.kind != "end":
            raise self.error(f"unexpected {t.text!r}")
        return v

    def expr_(self) -> float:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.error(f"expression nested deeper than {MAX_DEPTH}")
        v = self.term()
        while self.peek().kind == "op" and self.peek().text in "+-":
            op = self.take().text
            r = self.term()
            v = v + r if op == "+" else v - r
        self.depth -= 1
        return v

    def term(self) -> float:
        v = self.unary()
        while self.peek().kind == "op" and self.peek().text in "*/%":
            tok = self.take()
            r = self.unary()
            if tok.text == "*":
                v = v * r
            elif r == 0:
                raise self.error("division by zero", tok)
            elif tok.text == "/":
                v = v / r
            else:
                v = math.fmod(v, r)
        return v

    def unary(self) -> float:
        t = self.peek()
        if t.kind == "op" and t.text in "+-":
            self.take()
            self.depth += 1
            if self.depth > MAX_DEPTH:
                raise self.error(f"expression nested deeper than {MAX_DEPTH}")
            v = self.unary()
            self.depth -= 1
            return -v if t.text == "-" else v
        return self.primary()

    def primary(self) -> float:
        t = self.take()
        if t.kind == "num":
            return float(t.text)
        if t.kind == "name":
            if t.text in FUNCTIONS:
                self.expect("(")
                args = [self.expr_()]
                while self.peek().kind == "op" and self.peek().text == ",":
                    self.take()
                    args.append(self.expr_())
                self.expect(")")
                return float(FUNCTIONS[t.text](*args))
            if t.text in self.vars:
                nxt = self.peek()
                if nxt.kind == "op" and nxt.text == "(":
                    raise self.error(f"{t.text!r} is not a function", t)
                return float(self.vars[t.text])
            known = ", ".join(sorted([*self.vars, *FUNCTIONS]))
            raise self.error(f"unknown name {t.text!r} (known: {known})", t)
        if t.kind == "op" and t.text == "(":
            v = self.expr_()
            self.expect(")")
            return v
        if t.kind == "end":
            raise self.error("unexpected end of expression", t)
        raise self.error(f"unexpected {t.text!r}", t)


def evaluate(expr: str, variables: Mapping[str, float] | None = None) -> float:
    """Evaluate ``expr`` with the given variables (e.g. ``{"ram": 7812.5}``)."""
    if len(expr) > MAX_EXPR_LEN:
        raise SizeExprError(f"expression longer than {MAX_EXPR_LEN} characters", expr[:40], 0)
    v = _Parser(expr, variables or {}).parse()
    if not math.isfinite(v):
        raise SizeExprError("result is not a finite number", expr, 0)
    return v


def evaluate_mib(expr: str, ram_mib: float) -> float:
    """Evaluate a zram-generator expression in ``ram`` (MiB); the result is in MiB."""
    return evaluate(expr, {"ram": ram_mib})
