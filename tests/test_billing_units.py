"""Billing's pure parts: money and rounding, the versioned price table, plan terms."""

from __future__ import annotations

from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest
from pydantic import ValidationError
from tenantry_runtime.billing import (
    BillingTerms,
    Money,
    load_price_book,
    minor_unit,
    round_line,
)
from tenantry_runtime.billing.invoice import (
    Allowance,
    InvoiceError,
    ModelUsage,
    build_invoice,
    parse_month,
)
from tenantry_runtime.limits import Usage

BOOK = """{"currency": "USD", "unit": "per million tokens", "source": "test",
 "versions": [
  {"version": "v1", "effective_from": "2026-01-01T00:00:00Z",
   "models": {"m": {"input": "1", "output": "2", "cache_write": "1.25", "cache_read": "0.1"}}},
  {"version": "v2", "effective_from": "2026-11-15T12:00:00Z",
   "models": {"m": {"input": "3", "output": "4", "cache_write": "3.75", "cache_read": "0.3"}}}
 ]}"""


def test_round_half_even_to_the_minor_unit() -> None:
    assert round_line(Decimal("0.125"), "USD") == Decimal("0.12")
    assert round_line(Decimal("0.135"), "USD") == Decimal("0.14")
    assert round_line(Decimal("0.5"), "JPY") == Decimal("0")
    assert round_line(Decimal("1.5"), "JPY") == Decimal("2")
    assert round_line(Decimal("0.0005"), "KWD") == Decimal("0.000")
    assert minor_unit("EUR") == Decimal("0.01")


def test_money_refuses_floats_and_mixed_currencies() -> None:
    with pytest.raises(TypeError):
        Money(0.1, "USD")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="cannot add"):
        _ = Money(Decimal(1), "USD") + Money(Decimal(1), "EUR")
    total = Money(Decimal("0.1"), "USD") + Money(Decimal("0.2"), "USD")
    assert total.amount == Decimal("0.3") and str(total.rounded()) == "0.30 USD"


def test_a_price_change_applies_from_its_effective_date_never_before(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(BOOK)
    book = load_price_book(path)
    usage = Usage(input_tokens=1_000_000, output_tokens=1_000_000)
    before = datetime(2026, 11, 15, 11, 59, 59, 999999, tzinfo=UTC)
    after = datetime(2026, 11, 15, 12, 0, tzinfo=UTC)
    assert book.cost("m", usage, before) == (Decimal(3), "v1")
    assert book.cost("m", usage, after) == (Decimal(7), "v2")
    # Before the first version nothing is priced (no price is applied backwards).
    assert book.cost("m", usage, datetime(2025, 12, 31, tzinfo=UTC)) == (None, None)
    assert book.cost("other", usage, after) == (None, "v2")
    assert book.latest().version == "v2"


def test_cost_is_exact_for_odd_token_counts(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(BOOK)
    table = load_price_book(path).at(datetime(2026, 2, 1, tzinfo=UTC))
    assert table is not None
    cost = table.cost("m", Usage(input_tokens=1, output_tokens=3, cache_creation_input_tokens=7,
                                 cache_read_input_tokens=11))
    # 1*1 + 3*2 + 7*1.25 + 11*0.1 = 16.85 per million
    assert cost == Decimal("0.00001685")


def test_a_book_out_of_order_or_with_duplicate_names_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "prices.json"
    path.write_text(BOOK.replace("2026-11-15T12:00:00Z", "2025-01-01T00:00:00Z"))
    with pytest.raises(ValidationError, match="increasing effective_from"):
        load_price_book(path)
    path.write_text(BOOK.replace('"v2"', '"v1"'))
    with pytest.raises(ValidationError, match="unique"):
        load_price_book(path)
    path.write_text(BOOK.replace("2026-01-01T00:00:00Z", "2026-01-01T00:00:00"))
    with pytest.raises(ValidationError):
        load_price_book(path)  # a naive date is ambiguous


def test_the_shipped_book_prices_every_model_it_names() -> None:
    book = load_price_book()
    table = book.latest()
    assert book.currency == "USD" and table.models["claude-stub-1"].input == Decimal("1.00")


@pytest.mark.parametrize(("billing", "mode"), [
    ({}, "usage-list"),
    ({"includedMonthlyTokens": 1000, "overagePricePerMillionTokens": "3.00"}, "allowance+overage"),
    ({"overagePricePerMillionTokens": "2.5"}, "usage-flat"),
    ({"includedMonthlyTokens": 1000}, "allowance+list"),
])
def test_plan_billing_maps_to_one_of_the_ways_to_sell(billing: dict[str, object],
                                                      mode: str) -> None:
    assert BillingTerms.from_plan(billing).mode == mode


def test_terms_refuse_a_bad_rate() -> None:
    with pytest.raises(ValueError, match="not a decimal"):
        BillingTerms.from_plan({"overagePricePerMillionTokens": "abc"})
    with pytest.raises(ValidationError):
        BillingTerms.from_plan({"overagePricePerMillionTokens": "-1"})


# --- invoices (pure) ----------------------------------------------------------------------------


def _usage(model: str, tokens: int, cost: str, requests: int = 1) -> ModelUsage:
    return ModelUsage(model=model, requests=requests, input_tokens=tokens,
                      list_cost=Decimal(cost), currency="USD")


def test_allowance_and_overage_charges_tokens_beyond_the_allowance_at_the_plan_rate() -> None:
    terms = BillingTerms.from_plan({"includedMonthlyTokens": 1_000_000,
                                    "overagePricePerMillionTokens": "3.00"})
    invoice = build_invoice("t", date(2026, 11, 1), [
        _usage("b", 2_000_000, "6.00"), _usage("a", 1_500_000, "1.50")], terms)
    assert invoice.allowance == Allowance(1_000_000, 1_000_000, 2_500_000)
    assert [(x.kind, x.model, x.amount) for x in invoice.lines] == [
        ("usage", "a", Decimal(0)), ("usage", "b", Decimal(0)),
        ("overage", None, Decimal("7.50"))]
    assert invoice.total == Decimal("7.50") and invoice.mode == "allowance+overage"


def test_pure_usage_at_list_prices_rounds_each_line_once_half_even() -> None:
    invoice = build_invoice("t", date(2026, 11, 1), [
        _usage("a", 10, "0.125"), _usage("b", 10, "0.135"), _usage("c", 10, "0.0049999")],
        BillingTerms())
    assert [x.amount for x in invoice.lines] == [Decimal("0.12"), Decimal("0.14"),
                                                 Decimal("0.00")]
    # The total is the sum of the rounded lines (0.26), not the rounded sum (0.2649999 -> 0.26
    # here by chance; the lines are what the customer sees add up).
    assert invoice.total == Decimal("0.26")


def test_an_allowance_with_list_price_overage_covers_every_model_pro_rata() -> None:
    terms = BillingTerms.from_plan({"includedMonthlyTokens": 300})
    invoice = build_invoice("t", date(2026, 11, 1), [
        _usage("a", 100, "1.00"), _usage("b", 300, "3.00")], terms)
    # 400 tokens, 300 included: a quarter of each model's list cost is charged.
    assert [x.amount for x in invoice.lines] == [Decimal("0.25"), Decimal("0.75")]


def test_list_prices_in_another_currency_are_refused() -> None:
    with pytest.raises(InvoiceError, match="priced in USD, the plan bills in EUR"):
        build_invoice("t", date(2026, 11, 1), [_usage("a", 1, "1")],
                      BillingTerms(currency="EUR"))


def test_months_parse_strictly() -> None:
    assert parse_month("2026-11") == date(2026, 11, 1)
    for bad in ("2026-13", "2026-1", "26-11", "november"):
        with pytest.raises(ValueError, match="YYYY-MM"):
            parse_month(bad)


def test_the_progress_bar_draws_only_on_a_terminal() -> None:
    import io

    from tenantry_cli.output import Progress

    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    drawn, piped = Tty(), io.StringIO()
    assert list(Progress("work", 2, drawn).over("ab")) == ["a", "b"]
    assert list(Progress("work", 2, piped).over("ab")) == ["a", "b"]
    assert drawn.getvalue().endswith("work [" + "#" * 30 + "] 2/2\n") and "1/2" in drawn.getvalue()
    assert piped.getvalue() == ""
