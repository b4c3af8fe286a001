-- Tenants and their documents.
--
-- Every migration is applied unchanged to the shared schema, to each bridge schema and to a silo
-- database's schema: names stay unqualified and resolve through the search_path that migrate()
-- sets for the transaction (target schema first, then public for the vector extension).
--
-- Isolation: every table carries tenant_id and one policy `tenant_isolation`. RLS is FORCED so
-- that the table owner is filtered too; only superusers and BYPASSRLS roles see across tenants.
-- current_setting(..., true) is NULL when no tenant is set, so such a session sees no rows and
-- cannot insert any.

CREATE TABLE tenants (
    tenant_id  text PRIMARY KEY CHECK (tenant_id ~ '^[a-z][a-z0-9]{0,39}$'),
    isolation  text NOT NULL CHECK (isolation IN ('pool', 'bridge', 'silo')),
    state      text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'retained')),
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
ALTER TABLE tenants ENABLE ROW LEVEL SECURITY;
ALTER TABLE tenants FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON tenants
    USING (tenant_id = current_setting('app.current_tenant', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant', true));

CREATE TABLE documents (
    tenant_id  text NOT NULL DEFAULT current_setting('app.current_tenant', true),
    id         uuid NOT NULL DEFAULT gen_random_uuid(),
    title      text NOT NULL DEFAULT '',
    content    text NOT NULL,
    metadata   jsonb NOT NULL DEFAULT '{}'::jsonb,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id)
);
ALTER TABLE documents ENABLE ROW LEVEL SECURITY;
ALTER TABLE documents FORCE ROW LEVEL SECURITY;
CREATE POLICY tenant_isolation ON documents
    USING (tenant_id = current_setting('app.current_tenant', true))
    WITH CHECK (tenant_id = current_setting('app.current_tenant', true));
