"""`tenantry`: the admin CLI (usage, invoices, keys, tenants, doctor). docs/billing.md."""
