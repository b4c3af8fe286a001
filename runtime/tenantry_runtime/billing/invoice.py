"""A tenant's monthly invoice from its usage aggregates: pure, exact, reproducible.

Input: the month's usage per model (`ModelUsage`, summed from `ai_usage_logs`: token counts and
the exact cost each request was priced at when it started), the plan's `BillingTerms`, and for
each earlier closed month what was billed then and what its usage sums to now (late usage).
Output: an `Invoice` with

- one `usage` line per model: requests, the four token counts, the list value (exact sum of
  the stored costs) and the amount charged for it (list modes; 0 in flat-rate modes);
- the allowance: included tokens, consumed, overage units (tokens beyond it);
- one `overage` line in flat-rate modes: overage units x rate per million;
- `adjustment` lines: a closed month's lines recomputed now minus what was billed for them
  (its frozen invoice plus earlier adjustments), so late usage is billed once, next month.

Rounding (money.py): each line's amount is rounded once, ROUND_HALF_EVEN to the currency's
minor unit; the total is the sum of the rounded lines.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, time
from decimal import Decimal, localcontext
from typing import Any

from .money import exact, round_line
from .prices import MILLION
from .terms import BillingTerms

TOKEN_FIELDS = ("input_tokens", "output_tokens", "cache_creation_input_tokens",
                "cache_read_input_tokens")


class InvoiceError(ValueError):
    """The usage cannot be invoiced as asked (e.g. list prices in another currency)."""


def month_start(month: date) -> date:
    return month.replace(day=1)


def next_month(month: date) -> date:
    return date(month.year + month.month // 12, month.month % 12 + 1, 1)


def month_bounds(month: date) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month) in UTC."""
    first = month_start(month)
    return (datetime.combine(first, time(), tzinfo=UTC),
            datetime.combine(next_month(first), time(), tzinfo=UTC))


def parse_month(text: str) -> date:
    """'2026-11' -> date(2026, 11, 1); ValueError with the expected shape otherwise."""
    try:
        year, month = text.split("-")
        if len(year) != 4 or len(month) != 2:
            raise ValueError
        return date(int(year), int(month), 1)
    except ValueError:
        raise ValueError(f"expected a month as YYYY-MM, got {text[:20]!r}") from None


@dataclass(frozen=True)
class ModelUsage:
    """One model's usage in a month: sums over its rows."""

    model: str
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    # Exact sum of the costs stored on the priced rows; their currency (None: none priced).
    list_cost: Decimal = Decimal(0)
    currency: str | None = None
    unpriced_requests: int = 0

    @property
    def tokens(self) -> int:
        """Billable tokens: the four kinds the budgets count."""
        return sum(getattr(self, name) for name in TOKEN_FIELDS)


@dataclass(frozen=True)
class InvoiceLine:
    kind: str  # usage | overage | adjustment
    description: str
    amount: Decimal
    model: str | None = None
    requests: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    tokens: int = 0
    list_cost: Decimal = Decimal(0)
    unpriced_requests: int = 0
    for_month: str | None = None  # adjustments: the closed month they correct
    adjusts: str | None = None  # adjustments: the kind of line they correct

    @property
    def key(self) -> tuple[str, str | None]:
        """What an adjustment compares: the same kind of line for the same model."""
        return (self.adjusts or self.kind) if self.kind == "adjustment" else self.kind, self.model


@dataclass(frozen=True)
class Allowance:
    included_tokens: int
    consumed_tokens: int
    overage_tokens: int


@dataclass(frozen=True)
class Invoice:
    tenant: str
    month: str  # YYYY-MM
    currency: str
    mode: str
    status: str  # draft (open month) | closed (frozen)
    allowance: Allowance
    lines: tuple[InvoiceLine, ...]
    total: Decimal
    overage_rate_per_million: Decimal = Decimal(0)
    closed_at: str | None = None
    notes: tuple[str, ...] = field(default=())

    def charge_lines(self) -> tuple[InvoiceLine, ...]:
        """The month's own lines (what an adjustment later compares against)."""
        return tuple(line for line in self.lines if line.kind != "adjustment")

    def to_json(self) -> dict[str, Any]:
        """JSON-safe: amounts and costs as decimal strings, never floats."""
        data: dict[str, Any] = _jsonable(asdict(self))
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Invoice:
        lines = tuple(InvoiceLine(**{**line, "amount": Decimal(line["amount"]),
                                     "list_cost": Decimal(line["list_cost"])})
                      for line in data["lines"])
        return cls(tenant=data["tenant"], month=data["month"], currency=data["currency"],
                   mode=data["mode"], status=data["status"],
                   allowance=Allowance(**data["allowance"]), lines=lines,
                   total=Decimal(data["total"]),
                   overage_rate_per_million=Decimal(data["overage_rate_per_million"]),
                   closed_at=data.get("closed_at"), notes=tuple(data.get("notes", ())))


def _jsonable(value: Any) -> Any:
    if isinstance(value, Decimal):
        return f"{value:f}"
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _usage_line(usage: ModelUsage, amount: Decimal) -> InvoiceLine:
    return InvoiceLine(
        kind="usage", description=f"{usage.model}: {usage.requests} requests",
        amount=amount, model=usage.model, requests=usage.requests,
        input_tokens=usage.input_tokens, output_tokens=usage.output_tokens,
        cache_creation_input_tokens=usage.cache_creation_input_tokens,
        cache_read_input_tokens=usage.cache_read_input_tokens, tokens=usage.tokens,
        list_cost=usage.list_cost, unpriced_requests=usage.unpriced_requests)


def charge_lines(usage: Sequence[ModelUsage], terms: BillingTerms
                 ) -> tuple[list[InvoiceLine], Allowance, list[str]]:
    """Pure: the month's own lines (no adjustments), its allowance and notes."""
    usage = sorted((u for u in usage if u.requests), key=lambda u: u.model)
    total_tokens = sum(u.tokens for u in usage)
    consumed = min(total_tokens, terms.included_tokens)
    allowance = Allowance(terms.included_tokens, consumed, total_tokens - consumed)
    notes: list[str] = []
    unpriced = sum(u.unpriced_requests for u in usage)
    currency = terms.currency
    lines: list[InvoiceLine] = []
    with localcontext(exact()):
        if terms.overage_per_million > 0:
            # Flat plan rate: the model lines show the list value; one overage line charges.
            lines = [_usage_line(u, Decimal(0)) for u in usage]
            if allowance.overage_tokens:
                amount = allowance.overage_tokens * terms.overage_per_million / MILLION
                lines.append(InvoiceLine(
                    kind="overage", tokens=allowance.overage_tokens,
                    description=(f"{allowance.overage_tokens} tokens beyond the allowance at "
                                 f"{terms.overage_per_million:f} {currency} per million"),
                    amount=round_line(amount, currency)))
            return lines, allowance, notes
        foreign = {u.currency for u in usage if u.currency and u.currency != currency}
        if foreign:
            raise InvoiceError(f"usage was priced in {', '.join(sorted(foreign))}, the plan "
                               f"bills in {currency}: set the plan's currency or a flat rate")
        if unpriced:
            notes.append(f"{unpriced} request(s) of models without a price when they were "
                         "made are not charged (add the model to the price table)")
        for u in usage:
            # List prices; an allowance covers the same share of every model's cost.
            share = (Decimal(allowance.overage_tokens) / total_tokens) if total_tokens else 0
            lines.append(_usage_line(u, round_line(u.list_cost * share, currency)))
    return lines, allowance, notes


def adjustment_lines(month: date, now: Iterable[InvoiceLine],
                     billed: Iterable[InvoiceLine]) -> list[InvoiceLine]:
    """Pure: for closed `month`, its lines recomputed now minus everything billed for it."""
    label = month.strftime("%Y-%m")
    recomputed = {line.key: line for line in now}
    sums: dict[tuple[str, str | None], InvoiceLine] = {}
    for line in billed:
        sums[line.key] = _plus(sums.get(line.key), line)
    out: list[InvoiceLine] = []
    for key in sorted(set(recomputed) | set(sums), key=lambda k: (k[0], k[1] or "")):
        new, old = recomputed.get(key), sums.get(key)
        delta = _minus(new, old)
        if delta.amount or delta.requests or delta.tokens:
            what = key[1] or key[0]
            out.append(replace(delta, kind="adjustment", for_month=label, adjusts=key[0],
                               description=f"late usage of {label} ({key[0]}): {what}"))
    return out


def _counts(line: InvoiceLine | None) -> dict[str, Any]:
    names = ("requests", "tokens", "unpriced_requests", *TOKEN_FIELDS)
    values: dict[str, Any] = {n: 0 if line is None else getattr(line, n) for n in names}
    values["amount"] = Decimal(0) if line is None else line.amount
    values["list_cost"] = Decimal(0) if line is None else line.list_cost
    return values


def _plus(a: InvoiceLine | None, b: InvoiceLine) -> InvoiceLine:
    x, y = _counts(a), _counts(b)
    with localcontext(exact()):
        return replace(b, **{k: x[k] + y[k] for k in x})


def _minus(new: InvoiceLine | None, old: InvoiceLine | None) -> InvoiceLine:
    x, y = _counts(new), _counts(old)
    template = new or old
    assert template is not None
    with localcontext(exact()):
        return replace(template, **{k: x[k] - y[k] for k in x})


def build_invoice(tenant: str, month: date, usage: Sequence[ModelUsage], terms: BillingTerms,
                  adjustments: Sequence[InvoiceLine] = (), status: str = "draft",
                  closed_at: str | None = None) -> Invoice:
    """Pure: the invoice of `month` from its usage and the adjustments of closed months."""
    lines, allowance, notes = charge_lines(usage, terms)
    lines.extend(adjustments)
    with localcontext(exact()):
        total = sum((line.amount for line in lines), Decimal(0))
    return Invoice(tenant=tenant, month=month.strftime("%Y-%m"), currency=terms.currency,
                   mode=terms.mode, status=status, allowance=allowance, lines=tuple(lines),
                   total=round_line(total, terms.currency),
                   overage_rate_per_million=terms.overage_per_million, closed_at=closed_at,
                   notes=tuple(notes))
