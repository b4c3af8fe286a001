-- Closed (frozen) monthly invoices, one row per tenant and month.
--
-- Where the tenant's usage lives, like ai_usage_logs: the shared schema, each bridge schema,
-- each silo database. It has tenant_id, so the operator grants it like every tenant table and
-- an isolation upgrade moves it with the tenant's usage rows. A closed month is never
-- rewritten: billing inserts with ON CONFLICT DO NOTHING and reads the stored document back;
-- late usage of a closed month becomes an adjustment line on a later invoice (docs/billing.md).
-- document is the whole invoice as JSON, amounts as decimal strings (never floats); total
-- repeats its total for queries.

CREATE TABLE IF NOT EXISTS billing_invoices (
    tenant_id text NOT NULL DEFAULT current_setting('app.current_tenant', true),
    month     date NOT NULL CHECK (extract(day FROM month) = 1),
    currency  text NOT NULL,
    total     numeric(24, 6) NOT NULL,
    document  jsonb NOT NULL,
    closed_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, month),
    -- As 0004/0006 gave every tenant table: no empty or malformed tenant id, not even the admin's.
    CONSTRAINT tenant_id_valid CHECK (tenant_id ~ '^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$')
);
ALTER TABLE billing_invoices ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing_invoices FORCE ROW LEVEL SECURITY;
DROP POLICY IF EXISTS tenant_isolation ON billing_invoices;
CREATE POLICY tenant_isolation ON billing_invoices
    USING (tenant_id = current_setting('app.current_tenant', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant', true));
