"""Exact money: Decimal everywhere, rounded once per invoice line.

The rule: every intermediate amount is exact (token counts times per-million prices divided by
a power of ten are exact in Decimal; the one true division, a pro-rata share, is carried to 40
significant digits). An invoice line's amount is rounded once, to the currency's minor unit,
with ROUND_HALF_EVEN (banker's rounding: no upward drift over many lines). Totals are sums of
rounded lines, so the lines always add up to the total on the page.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Context, Decimal, localcontext

ROUNDING = ROUND_HALF_EVEN
# Digits after the point of the ISO 4217 minor unit; the rest use 2.
MINOR_UNITS: dict[str, int] = {"JPY": 0, "KRW": 0, "CLP": 0, "ISK": 0, "VND": 0,
                               "BHD": 3, "KWD": 3, "OMR": 3, "JOD": 3, "TND": 3}
# Precision for the (rare) inexact step; sums of exact products never reach it.
PRECISION = 40


def minor_unit(currency: str) -> Decimal:
    """The currency's smallest unit as a quantum: Decimal('0.01') for USD."""
    return Decimal(1).scaleb(-MINOR_UNITS.get(currency.upper(), 2))


def exact() -> Context:
    """A context for billing arithmetic (use as `with localcontext(exact()):`)."""
    return Context(prec=PRECISION, rounding=ROUNDING)


def round_line(amount: Decimal, currency: str) -> Decimal:
    """The once-per-line rounding: to the minor unit, half to even."""
    with localcontext(exact()):
        return amount.quantize(minor_unit(currency), rounding=ROUNDING)


@dataclass(frozen=True, order=True)
class Money:
    """An exact amount in one currency; `str` gives e.g. '12.34 USD'."""

    amount: Decimal
    currency: str

    def __post_init__(self) -> None:
        if not isinstance(self.amount, Decimal) or not self.amount.is_finite():
            raise TypeError(f"money must be a finite Decimal, got {self.amount!r}")

    def __add__(self, other: Money) -> Money:
        if other.currency != self.currency:
            raise ValueError(f"cannot add {other.currency} to {self.currency}")
        with localcontext(exact()):
            return Money(self.amount + other.amount, self.currency)

    def rounded(self) -> Money:
        return Money(round_line(self.amount, self.currency), self.currency)

    def __str__(self) -> str:
        return f"{self.amount:f} {self.currency}"
