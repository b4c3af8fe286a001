"""The versioned price table: per model input, output, cache write and cache read prices per
million tokens, in versions with an effective date. A request is priced with the version in
effect when it started (`PriceBook.at`), so a price change applies from its effective date and
never retroactively; the row keeps the cost and the version's name (`price_version`).

Data in prices.json (or `TENANTRY_PRICE_TABLE`), not code.
"""

from __future__ import annotations

from bisect import bisect_right
from datetime import datetime
from decimal import Decimal
from functools import cached_property
from importlib.resources import files
from pathlib import Path

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from ..limits import Usage

MILLION = Decimal(1_000_000)


class ModelPrice(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    input: Decimal = Field(ge=0)
    output: Decimal = Field(ge=0)
    cache_write: Decimal = Field(ge=0)
    cache_read: Decimal = Field(ge=0)

    def cost(self, usage: Usage) -> Decimal:
        """Exact: sums of integer counts times decimal prices, over a power of ten."""
        total = (usage.input_tokens * self.input + usage.output_tokens * self.output
                 + usage.cache_creation_input_tokens * self.cache_write
                 + usage.cache_read_input_tokens * self.cache_read)
        return total / MILLION


class PriceTable(BaseModel):
    """One version of the prices, in effect from `effective_from` until the next version's."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    effective_from: AwareDatetime
    currency: str
    unit: str = "per million tokens"
    source: str = ""
    models: dict[str, ModelPrice]

    def cost(self, model: str, usage: Usage) -> Decimal | None:
        """Pure: the request's cost, None for a model this version does not price."""
        price = self.models.get(model)
        return None if price is None else price.cost(usage)


class _Version(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    version: str
    effective_from: AwareDatetime
    models: dict[str, ModelPrice]


class PriceBook(BaseModel):
    """All versions; one currency (a price book in two currencies is two books)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    currency: str = Field(pattern=r"^[A-Z]{3}$")
    unit: str
    source: str
    versions: tuple[_Version, ...] = Field(min_length=1)

    @model_validator(mode="after")
    def _ordered_and_unique(self) -> PriceBook:
        starts = [v.effective_from for v in self.versions]
        if starts != sorted(starts) or len(set(starts)) != len(starts):
            raise ValueError("versions must be in increasing effective_from order, no ties")
        names = [v.version for v in self.versions]
        if len(set(names)) != len(names):
            raise ValueError("version names must be unique")
        return self

    @cached_property
    def _tables(self) -> tuple[list[datetime], list[PriceTable]]:
        tables = [PriceTable(version=v.version, effective_from=v.effective_from,
                             currency=self.currency, unit=self.unit, source=self.source,
                             models=v.models) for v in self.versions]
        return [t.effective_from for t in tables], tables

    def at(self, when: datetime) -> PriceTable | None:
        """The version in effect at `when` (aware), None before the first one."""
        starts, tables = self._tables
        index = bisect_right(starts, when)
        return tables[index - 1] if index else None

    def latest(self) -> PriceTable:
        return self._tables[1][-1]

    def cost(self, model: str, usage: Usage, when: datetime) -> tuple[Decimal | None, str | None]:
        """The cost at the price in effect at `when` and that version's name."""
        table = self.at(when)
        if table is None:
            return None, None
        return table.cost(model, usage), table.version


def load_price_book(path: Path | None = None) -> PriceBook:
    """The book at `path`, else the one shipped with the runtime."""
    raw = path.read_bytes() if path is not None else (
        files("tenantry_runtime").joinpath("prices.json").read_bytes())
    return PriceBook.model_validate_json(raw)


def load_price_table(path: Path | None = None) -> PriceTable:
    """The newest version of the book (tools that show current prices)."""
    return load_price_book(path).latest()
