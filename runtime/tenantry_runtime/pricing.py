"""Cost of a request: the versioned price table lives in `billing.prices` (data in
prices.json); this module keeps the runtime's historical import path."""

from __future__ import annotations

from .billing.prices import (
    MILLION,
    ModelPrice,
    PriceBook,
    PriceTable,
    load_price_book,
    load_price_table,
)

__all__ = ["MILLION", "ModelPrice", "PriceBook", "PriceTable", "load_price_book",
           "load_price_table"]
