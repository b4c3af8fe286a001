-- Usage export to billing providers (tenantry_runtime.export): an order rows can be resumed in.
--
-- created_at is the request's start, not when the row arrived: the usage writer inserts rows
-- seconds (or, while Postgres or a tenant's DSN is away, hours) later, so a checkpoint on
-- created_at would skip late rows. export_xid is the inserting transaction's id instead. The
-- exporter reads only rows with export_xid below the oldest transaction still running
-- (pg_snapshot_xmin): no row with a smaller id can commit after that, so a checkpoint on
-- (export_xid, tenant_id, request_id, created_at) never passes a row that appears later.
-- Rows written before this migration get 0 (exported first, in key order). Adding a column
-- with a constant default rewrites nothing; the volatile default applies to new rows only.
-- Unqualified and idempotent like every migration (shared schema, bridge schemas, silo
-- databases); the checkpoints live in the operator's private schema, out of tenants' reach.

ALTER TABLE ai_usage_logs ADD COLUMN IF NOT EXISTS export_xid xid8 NOT NULL DEFAULT '0';
ALTER TABLE ai_usage_logs ALTER COLUMN export_xid SET DEFAULT pg_current_xact_id();
CREATE INDEX IF NOT EXISTS ai_usage_logs_export_idx
    ON ai_usage_logs (export_xid, tenant_id, request_id, created_at);
