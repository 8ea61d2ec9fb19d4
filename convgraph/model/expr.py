"""Integer expressions over symbolic dims: the shapes and MACs of a model whose input dims are left dynamic.

An :class:`Expr` is a polynomial with rational coefficients over atoms: symbols (``"H"``) and floor
divisions of an integer polynomial by a positive integer (``(H+3)//4``). It is kept in one canonical
form, so equal dims compare equal and nested divisions collapse: ``floor((floor(x/a) + c)/b) =
floor((x + a·c)/(a·b))`` turns ``((H-1)//2+1-1)//2+1`` into ``(H+3)//4``. A division's numerator is
normalised to a positive leading coefficient, a constant in ``[0, k)`` and no factor shared with ``k``.
Symbols stand for dims ≥ 1. Operations mix freely with Python ints; an Expr with no symbol left is an int.
``str(e)`` is a Python integer expression (``+ - * //``, parentheses, integers, identifiers);
:meth:`Expr.compact` is the short form tables show (``7.9k·H·W``).
"""

from __future__ import annotations

import ast
import math
from fractions import Fraction
from numbers import Rational
from typing import Mapping, Union

Number = Union[int, Fraction]


class Floor:
    """The atom ``num // k`` (``num`` an integer-coefficient Expr in canonical form, ``k`` > 1)."""

    __slots__ = ("num", "k", "_key", "_hash")

    def __init__(self, num: "Expr", k: int):
        self.num, self.k = num, k
        self._key = f"({num})//{k}" if len(num.terms) > 1 or list(num.terms.values()) != [1] else f"{num}//{k}"
        self._hash = hash(self._key)

    def __eq__(self, other) -> bool:
        return isinstance(other, Floor) and self._key == other._key

    def __hash__(self) -> int:
        return self._hash

    def __str__(self) -> str:
        return self._key


def _atom_key(a) -> tuple:
    return (0, a) if isinstance(a, str) else (1, a.k, a._key)  # floors by divisor: ⌈H/2⌉ before ⌈H/16⌉


def _mono_key(m: tuple) -> tuple:
    """Monomials print highest degree first, then by their atoms."""
    return (-len(m), [_atom_key(a) for a in m])


class Expr:
    """An immutable canonical polynomial over symbols and :class:`Floor` atoms (see the module doc)."""

    __slots__ = ("terms", "_str", "_hash")

    def __init__(self, terms: dict):
        self.terms = terms  # monomial (sorted tuple of atoms; () is the constant) → nonzero int or Fraction
        self._str: str | None = None
        self._hash: int | None = None

    # ---- construction ----
    @staticmethod
    def symbol(name: str) -> "Expr":
        return Expr({(name,): 1})

    @staticmethod
    def make(terms: dict) -> "Expr | Number":
        """An Expr of ``terms`` with zeros dropped; a plain number when no symbol is left."""
        terms = {m: c for m, c in terms.items() if c}
        if not terms:
            return 0
        if len(terms) == 1 and () in terms:
            c = terms[()]
            return int(c) if isinstance(c, Fraction) and c.denominator == 1 else c
        return Expr(terms)

    # ---- structure ----
    def constant(self) -> Number:
        return self.terms.get((), 0)

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for m in self.terms:
            for a in m:
                out.update((a,) if isinstance(a, str) else a.num.symbols())
        return out

    def integral(self) -> bool:
        return all(type(c) is int for c in self.terms.values())

    def size(self) -> int:
        """The atoms and terms it is made of (to check that expressions stay small)."""
        return sum(1 + sum(1 if isinstance(a, str) else 1 + a.num.size() for a in m) for m in self.terms)

    # ---- arithmetic ----
    def __add__(self, other) -> "Expr | Number":
        o = _terms(other)
        if o is None:
            return NotImplemented
        out = dict(self.terms)
        for m, c in o.items():
            out[m] = out.get(m, 0) + c
        return Expr.make(out)

    __radd__ = __add__

    def __neg__(self) -> "Expr":
        return Expr({m: -c for m, c in self.terms.items()})

    def __pos__(self) -> "Expr":
        return self

    def __sub__(self, other) -> "Expr | Number":
        return self + (-other)

    def __rsub__(self, other) -> "Expr | Number":
        return (-self) + other

    def __mul__(self, other) -> "Expr | Number":
        o = _terms(other)
        if o is None:
            return NotImplemented
        out: dict = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in o.items():
                m = tuple(sorted(m1 + m2, key=_atom_key)) if m1 and m2 else m1 or m2
                out[m] = out.get(m, 0) + c1 * c2
        return Expr.make(out)

    __rmul__ = __mul__

    def __floordiv__(self, other) -> "Expr | Number":
        """Floor division by a positive integer, or exact division by a monomial; NotImplemented otherwise."""
        if isinstance(other, Expr):
            return self.exact_div(other) or NotImplemented
        if not isinstance(other, Rational) or other <= 0:
            return NotImplemented
        return floor_div(self, Fraction(other))

    def __truediv__(self, other) -> "Expr | Number":
        """Division by a nonzero number: rational coefficients (floats from Cast/Resize scales)."""
        if isinstance(other, Expr) or not isinstance(other, Rational) or other == 0:
            return NotImplemented
        return self * (1 / Fraction(other))

    def __mod__(self, other) -> "Expr | Number":
        q = self // other
        return NotImplemented if q is NotImplemented else self - q * other

    def exact_div(self, other: "Expr") -> "Expr | Number | None":
        """``self / other`` when ``other`` is one monomial dividing every term exactly, else None."""
        if len(other.terms) != 1:
            return None
        (m2, c2), = other.terms.items()
        out = {}
        for m, c in self.terms.items():
            rest = list(m)
            for a in m2:
                if a not in rest:
                    return None
                rest.remove(a)
            q = Fraction(c) / c2
            if q.denominator != 1:
                return None
            out[tuple(rest)] = int(q)
        return Expr.make(out)

    def floor(self) -> "Expr | Number":
        return floor_div(self, Fraction(1))

    # ---- comparison ----
    def __eq__(self, other) -> bool:
        return isinstance(other, Expr) and self.terms == other.terms

    def __hash__(self) -> int:
        if self._hash is None:
            self._hash = hash(frozenset(self.terms.items()))
        return self._hash

    # ---- evaluation and text ----
    def evaluate(self, values: Mapping[str, int]) -> Number:
        """The value with each symbol given (KeyError for a missing one)."""
        total: Number = 0
        for m, c in self.terms.items():
            v = c
            for a in m:
                v *= values[a] if isinstance(a, str) else math.floor(Fraction(a.num.evaluate(values)) / a.k)
            total += v
        return total

    def __str__(self) -> str:
        if self._str is None:
            self._str = _text(self, _mono_text, "*", _num)
        return self._str

    def __repr__(self) -> str:  # as in messages: (N, 16, (H+1)//2)
        return str(self)

    def compact(self, exact: bool = False, spaced: bool = False) -> str:
        """Short human form: ``7.9k·H·W``, ``⌈H/4⌉`` for ``(H+3)//4``, ``⌊H/4⌋`` for ``H//4``; ``exact``:
        coefficients in full (``3,089,664·N·⌈H/32⌉``); ``spaced``: terms joined by `` + `` (a table cell may
        then wrap between them)."""
        return _text(self, lambda m, alone: "·".join(_compact_atom(a) for a in m), "·",
                     _grouped if exact else _human, " " if spaced else "")


def _terms(x) -> dict | None:
    if isinstance(x, Expr):
        return x.terms
    if isinstance(x, bool) or not isinstance(x, Rational):
        return None
    return {(): x} if x else {}


def _mono_text(m: tuple, alone: bool) -> str:
    if alone and len(m) == 1:
        return str(m[0])
    return "*".join(a if isinstance(a, str) else f"({a})" for a in m)


def _num(c: Number) -> str:
    return str(c) if type(c) is int or c.denominator == 1 else f"{c.numerator}/{c.denominator}"


def _grouped(c: Number) -> str:
    return f"{c:,}" if type(c) is int else _num(c)


def _human(c: Number) -> str:
    a = abs(float(c))
    for unit, scale in (("G", 10**9), ("M", 10**6), ("k", 10**3)):
        if a >= scale:
            v = float(c) / scale
            return f"{v:.2g}{unit}" if abs(v) < 10 else f"{v:.0f}{unit}"
    return _num(c)


def _compact_atom(a) -> str:
    if isinstance(a, str):
        return a
    num, k = a.num, a.k
    c = num.constant()
    if c == k - 1:  # (x + k-1)//k = ⌈x/k⌉
        return f"⌈{_bare(num - c)}/{k}⌉"
    if c == 0:
        return f"⌊{_bare(num)}/{k}⌋"
    return f"⌊({num.compact()})/{k}⌋"


def _bare(e) -> str:
    text = e.compact() if isinstance(e, Expr) else str(e)
    return text if isinstance(e, Expr) and len(e.terms) == 1 and list(e.terms.values())[0] == 1 else f"({text})"


def _text(e: Expr, mono, times: str, number, space: str = "") -> str:
    """Terms highest degree first, constant last: ``c*m`` joined with ``+``/``-`` (``space`` around them)."""
    parts: list[tuple[str, str]] = []
    for m in sorted(e.terms, key=_mono_key):
        c = e.terms[m]
        sign = "-" if c < 0 else "+"
        a = -c if c < 0 else c
        alone = a == 1 and (c > 0 or parts)  # a leading unary minus binds tighter than //: -((H+1)//2)
        body = number(a) if not m else (mono(m, True) if alone else
                                         mono(m, False) if a == 1 else f"{number(a)}{times}{mono(m, False)}")
        parts.append((sign, body))
    first_sign, first = parts[0]
    return ("-" if first_sign == "-" else "") + first + "".join(f"{space}{s}{space}{b}" for s, b in parts[1:])


def floor_div(e: "Expr | Number", k: Fraction) -> "Expr | Number":
    """``floor(e / k)`` for a positive rational ``k``, in canonical form (see the module doc)."""
    if not isinstance(e, Expr):
        return math.floor(Fraction(e) / k)
    # integer coefficients over an integer divisor: floor(e/k) = floor(L·e / L·k)
    mult = k.denominator
    for c in e.terms.values():
        if isinstance(c, Fraction):
            mult = mult * c.denominator // math.gcd(mult, c.denominator)
    return _floor_int({m: int(c * mult) for m, c in e.terms.items()}, int(k * mult))


def _floor_int(terms: dict, d: int) -> "Expr | Number":
    """floor(Σ terms / d), ``terms`` with int coefficients, d ≥ 1."""
    if d == 1:
        return Expr.make(terms)
    quotient, rest = {}, {}
    for m, c in terms.items():
        # floor((d·q·m + r·m + ...)/d) = q·m + floor((r·m + ...)/d): the constant's r in [0, d), a term's
        # r of its own sign (so that -floor(-x/d) and floor((x + d-1)/d) end in the same form)
        q, r = divmod(c, d) if not m or c > 0 else (-(-c // d), -(-c % d))
        if q:
            quotient[m] = q
        if r:
            rest[m] = r
    if not any(m for m in rest):
        return Expr.make(quotient)
    g = d
    for c in rest.values():
        g = math.gcd(g, c)
    if g > 1:
        rest = {m: c // g for m, c in rest.items()}
        d //= g
        if d == 1:
            return Expr.make(quotient) + Expr.make(rest)
    lead = rest[min((m for m in rest if m), key=_mono_key)]
    if lead < 0:  # floor(r/d) = -floor((-r + d - 1)/d)
        flipped = {m: -c for m, c in rest.items()}
        flipped[()] = flipped.get((), 0) + d - 1
        return Expr.make(quotient) - _floor_int(flipped, d)
    const = rest.get((), 0)
    inner = [m for m in rest if m]
    if len(inner) == 1 and len(inner[0]) == 1 and rest[inner[0]] == 1 and isinstance(inner[0][0], Floor):
        a = inner[0][0]  # floor((floor(x/a) + c)/d) = floor((x + a·c)/(a·d))
        terms = dict(a.num.terms)
        terms[()] = terms.get((), 0) + a.k * const
        return Expr.make(quotient) + _floor_int(terms, a.k * d)
    num = Expr({m: c for m, c in rest.items() if c})
    return Expr.make(quotient) + Expr({(Floor(num, d),): 1})


def is_dim(d) -> bool:
    """A dim known as an int or an Expr (not None / an unnamed unknown)."""
    return isinstance(d, Expr) or (isinstance(d, int) and not isinstance(d, bool))


_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.FloorDiv: lambda a, b: a // b}


def parse(text: str) -> "Expr | int":
    """The Expr of a Python integer expression (``+ - * //``, parentheses, integers, identifiers), as
    ``str(Expr)`` writes it; ValueError for anything else."""

    def build(node):
        if isinstance(node, ast.Expression):
            return build(node.body)
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](build(node.left), build(node.right))
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = build(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.Constant) and type(node.value) is int:
            return node.value
        if isinstance(node, ast.Name):
            return Expr.symbol(node.id)
        raise ValueError(f"not an integer expression: {text!r}")

    try:
        return build(ast.parse(str(text), mode="eval"))
    except SyntaxError:
        raise ValueError(f"not an integer expression: {text!r}") from None
