"""Cost of a request from a versioned price table (data in prices.json, not code)."""

from __future__ import annotations

from decimal import Decimal
from importlib.resources import files
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from .limits import Usage

MILLION = Decimal(1_000_000)


class ModelPrice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Decimal
    output: Decimal
    cache_write: Decimal
    cache_read: Decimal


class PriceTable(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    currency: str
    unit: str
    source: str
    models: dict[str, ModelPrice]

    def cost(self, model: str, usage: Usage) -> Decimal | None:
        """Pure: the request's cost, None for a model the table does not price."""
        price = self.models.get(model)
        if price is None:
            return None
        total = (usage.input_tokens * price.input + usage.output_tokens * price.output
                 + usage.cache_creation_input_tokens * price.cache_write
                 + usage.cache_read_input_tokens * price.cache_read)
        return total / MILLION


def load_price_table(path: Path | None = None) -> PriceTable:
    """The table at `path`, else the one shipped with the package."""
    raw = path.read_bytes() if path is not None else (
        files(__package__).joinpath("prices.json").read_bytes())
    return PriceTable.model_validate_json(raw)
