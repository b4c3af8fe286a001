"""Pure billing logic shared by invoices, the usage export and the alerts.

- `money`: exact Decimal amounts, the currency's minor unit and the one rounding rule.
- `prices`: the versioned price table (effective dates per version) and the cost of a request.
- `terms`: a plan's commercial terms (allowance, overage rate, currency) as exact values.
- `invoice`: a month's invoice from per-model aggregates (pure); `invoices`: the SQL side.
"""

from .money import MINOR_UNITS, ROUNDING, Money, exact, minor_unit, round_line
from .prices import ModelPrice, PriceBook, PriceTable, load_price_book, load_price_table
from .terms import BillingTerms

__all__ = ["MINOR_UNITS", "ROUNDING", "BillingTerms", "ModelPrice", "Money", "PriceBook",
           "PriceTable", "exact", "load_price_book", "load_price_table", "minor_unit",
           "round_line"]
