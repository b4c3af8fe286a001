-- Conversations and usage logs, partitioned by month on created_at.
--
-- Monthly partitions are created ahead of time by ensure_partitions(); the DEFAULT partition
-- catches anything outside them so no insert is ever lost (ensure_partitions moves such rows
-- into a new month's partition when it creates it).
--
-- Partitions get the same policy as their parent. Access through the parent only applies the
-- parent's policy, and no role but the owner has privileges on a partition itself; the copy is
-- defence in depth should a partition ever be granted or detached.

CREATE TABLE ai_conversations (
    tenant_id  text NOT NULL DEFAULT current_setting('app.current_tenant', true),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(),
    title      text NOT NULL DEFAULT '',
    model      text,
    messages   jsonb NOT NULL DEFAULT '[]'::jsonb,
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    -- a unique key on a partitioned table must contain the partition key
    PRIMARY KEY (tenant_id, id, created_at)
) PARTITION BY RANGE (created_at);
ALTER TABLE ai_conversations ENABLE ROW LEVEL SECURITY;
ALTER TABLE ai_conversations FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ai_conversations
    USING (tenant_id = current_setting('app.current_tenant', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant', true));

CREATE TABLE ai_conversations_default PARTITION OF ai_conversations DEFAULT;
ALTER TABLE ai_conversations_default ENABLE ROW LEVEL SECURITY;
ALTER TABLE ai_conversations_default FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ai_conversations_default
    USING (tenant_id = current_setting('app.current_tenant', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant', true));

-- Metering is idempotent on the request: the runtime inserts with
--   INSERT ... ON CONFLICT (tenant_id, request_id, created_at) DO NOTHING
-- LIMITATION: a unique key on a partitioned table must include the partition key, so the key is
-- (tenant_id, request_id, created_at), not (tenant_id, request_id). A retry deduplicates only if it
-- carries the SAME created_at: the runtime stamps the request once, when it starts, and reuses
-- that timestamp for every retry. Hence no DEFAULT now() on created_at: a retry that fell back to
-- now() would be counted twice.
CREATE TABLE ai_usage_logs (
    tenant_id                   text NOT NULL DEFAULT current_setting('app.current_tenant', true),
    request_id                  text NOT NULL,
    created_at                  timestamptz NOT NULL,
    model                       text NOT NULL,
    conversation_id             uuid,
    input_tokens                bigint NOT NULL DEFAULT 0 CHECK (input_tokens >= 0),
    output_tokens               bigint NOT NULL DEFAULT 0 CHECK (output_tokens >= 0),
    cache_creation_input_tokens bigint NOT NULL DEFAULT 0 CHECK (cache_creation_input_tokens >= 0),
    cache_read_input_tokens     bigint NOT NULL DEFAULT 0 CHECK (cache_read_input_tokens >= 0),
    PRIMARY KEY (tenant_id, request_id, created_at)
) PARTITION BY RANGE (created_at);
-- rollup_usage() reads one day at a time
CREATE INDEX ai_usage_logs_created_at_idx ON ai_usage_logs (created_at);
ALTER TABLE ai_usage_logs ENABLE ROW LEVEL SECURITY;
ALTER TABLE ai_usage_logs FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ai_usage_logs
    USING (tenant_id = current_setting('app.current_tenant', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant', true));

CREATE TABLE ai_usage_logs_default PARTITION OF ai_usage_logs DEFAULT;
ALTER TABLE ai_usage_logs_default ENABLE ROW LEVEL SECURITY;
ALTER TABLE ai_usage_logs_default FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON ai_usage_logs_default
    USING (tenant_id = current_setting('app.current_tenant', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant', true));
