-- An empty tenant setting is no tenant, and every tenant_id is a valid tenant id.
--
-- After a transaction that set it, RESET, DISCARD or set_config(NULL), app.current_tenant reads
-- '' (not NULL). With the policies of 0001-0003 a session that forgot to set its tenant could
-- then write rows with tenant_id = '' (the column default) and read those of any other such
-- session: one shared empty bucket. Here, for every table of this schema that has tenant_id
-- (embeddings tables created by the operator included):
--   * the policy treats '' as NULL (matches nothing, admits nothing);
--   * the column default does the same, so a forgotten tenant fails with a NOT NULL violation;
--   * CHECK tenant_id_valid refuses any tenant_id that is not a valid tenant id. Existing rows
--     that violate it are kept: the constraint is then left NOT VALID (still enforced for every
--     new or updated row) and a WARNING names the table, for an administrator to inspect.
-- Keep the pattern in step with TENANT_ID_PATTERN in database.py.

DO $$
DECLARE
    rel regclass;
    is_partition boolean;
    has_default boolean;
    dirty boolean;
BEGIN
    FOR rel, is_partition, has_default IN
        SELECT c.oid::regclass, c.relispartition, a.atthasdef
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
          AND a.attname = 'tenant_id' AND NOT a.attisdropped
        ORDER BY c.relname
    LOOP
        IF EXISTS (SELECT 1 FROM pg_policy WHERE polrelid = rel AND polname = 'tenant_isolation')
        THEN
            EXECUTE format($f$ALTER POLICY tenant_isolation ON %s
                USING (tenant_id = NULLIF(current_setting('app.current_tenant', true), ''))
                WITH CHECK (tenant_id = NULLIF(current_setting('app.current_tenant', true), ''))
                $f$, rel);
        END IF;
        -- Partitions inherit the parent's constraint; inserts through the parent use its default.
        CONTINUE WHEN is_partition;
        IF has_default THEN
            EXECUTE format($f$ALTER TABLE %s ALTER COLUMN tenant_id
                SET DEFAULT NULLIF(current_setting('app.current_tenant', true), '')$f$, rel);
        END IF;
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_constraint
                              WHERE conrelid = rel AND conname = 'tenant_id_valid');
        EXECUTE format($f$ALTER TABLE %s ADD CONSTRAINT tenant_id_valid
            CHECK (tenant_id ~ '^[a-z][a-z0-9]{0,39}$') NOT VALID$f$, rel);
        EXECUTE format($f$SELECT EXISTS (SELECT 1 FROM %s
            WHERE NOT (tenant_id ~ '^[a-z][a-z0-9]{0,39}$'))$f$, rel) INTO dirty;
        IF dirty THEN
            RAISE WARNING 'table % keeps rows with an invalid tenant_id: tenant_id_valid is NOT VALID',
                rel;
        ELSE
            EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT tenant_id_valid', rel);
        END IF;
    END LOOP;
END
$$;
