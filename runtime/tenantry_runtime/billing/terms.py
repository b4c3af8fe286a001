"""A plan's commercial terms (TenantPlan `spec.billing`) as exact values.

The three ways to sell, all from these fields:
- allowance + overage: `includedMonthlyTokens` > 0 and `overagePricePerMillionTokens` > 0:
  tokens up to the allowance are in the plan's price, every token beyond costs the rate;
- pure usage: `includedMonthlyTokens` = 0, either at the plan's flat rate (rate > 0) or, with
  rate "0", at the versioned price table's list prices (the cost stored on each request);
- an allowance with list-price overage: allowance > 0 and rate "0": the allowance covers the
  same share of every model's list cost (pro rata), the rest is charged;
- tiers gate models and features: the plan's `model` (the runtime refuses any other with an
  Anthropic-shaped invalid_request_error, policy.check_model), `maxTokensPerRequest`,
  `allowedIsolation` and `tier` (admission priority).

Billable tokens are the ones the budgets count: input + output + cache write + cache read.
"""

from __future__ import annotations

from collections.abc import Mapping
from decimal import Decimal, InvalidOperation
from typing import Any

from pydantic import BaseModel, ConfigDict, Field


class BillingTerms(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    included_tokens: int = Field(0, ge=0)
    overage_per_million: Decimal = Field(Decimal(0), ge=0)
    currency: str = Field("USD", pattern=r"^[A-Z]{3}$")

    @property
    def mode(self) -> str:
        """'allowance+overage', 'usage-flat', 'allowance+list' or 'usage-list'."""
        if self.overage_per_million > 0:
            return "allowance+overage" if self.included_tokens else "usage-flat"
        return "allowance+list" if self.included_tokens else "usage-list"

    @classmethod
    def from_plan(cls, billing: Mapping[str, Any] | None) -> BillingTerms:
        """From a TenantPlan's `spec.billing` (camelCase, the CRD's defaults for gaps)."""
        billing = billing or {}
        try:
            rate = Decimal(str(billing.get("overagePricePerMillionTokens", "0")))
        except InvalidOperation:
            raise ValueError("overagePricePerMillionTokens is not a decimal") from None
        return cls(included_tokens=int(billing.get("includedMonthlyTokens", 0)),
                   overage_per_million=rate, currency=str(billing.get("currency", "USD")))
