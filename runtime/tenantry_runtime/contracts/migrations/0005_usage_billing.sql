-- What billing needs of each usage row, beyond the token counts of 0002.
--
-- cost is exact: numeric, never float (a sum of a million rows must equal the invoice). It is
-- NULL when the price table did not price the model (the runtime counts those). price_version
-- names the price table the cost came from, so a repricing never leaves a row ambiguous.
-- latency_ms is the runtime's wall time for the request, status the HTTP status the client got
-- (499: the client left, the answer was still read and billed), endpoint "shared" or
-- "dedicated", api_key_name the tenant's key name (never the key).
--
-- Idempotent (IF NOT EXISTS) and unqualified like every migration: applied to the shared
-- schema, each bridge schema and each silo database. Columns added to a partitioned parent
-- reach its partitions; table-level grants and RLS policies cover new columns.

ALTER TABLE ai_usage_logs
    ADD COLUMN IF NOT EXISTS cost          numeric(20, 10) CHECK (cost >= 0),
    ADD COLUMN IF NOT EXISTS currency      text,
    ADD COLUMN IF NOT EXISTS price_version text,
    ADD COLUMN IF NOT EXISTS latency_ms    numeric(12, 1) CHECK (latency_ms >= 0),
    ADD COLUMN IF NOT EXISTS status        smallint,
    ADD COLUMN IF NOT EXISTS endpoint      text,
    ADD COLUMN IF NOT EXISTS api_key_name  text,
    ADD COLUMN IF NOT EXISTS stream        boolean;

-- The daily rollup carries the cost too (sum of the priced rows).
ALTER TABLE usage_daily ADD COLUMN IF NOT EXISTS cost numeric(24, 10) NOT NULL DEFAULT 0;
