-- Tenant ids may contain hyphens: a DNS label of at most 40 characters starting with a letter
-- (`acme-corp`), as TENANT_ID_PATTERN in database.py now says.
--
-- For every table of this schema that has tenant_id (embeddings tables created by the operator
-- included), every CHECK constraint that still holds the former pattern (tenant_id_valid from
-- 0004, the inline check of 0001 on `tenants`) is dropped, and tenant_id_valid is added again
-- with the new pattern. The new pattern accepts every id the old one did, so no existing row
-- can violate it; a constraint left NOT VALID by 0004 (rows an administrator should inspect)
-- stays NOT VALID. Safe to re-run: nothing is left that holds the former pattern.
-- Keep the pattern in step with TENANT_ID_PATTERN in database.py.

DO $$
DECLARE
    rel regclass;
    con record;
    was_valid boolean;
BEGIN
    FOR rel IN
        SELECT c.oid::regclass
        FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid
        WHERE c.relnamespace = current_schema()::regnamespace AND c.relkind IN ('r', 'p')
          AND NOT c.relispartition
          AND a.attname = 'tenant_id' AND NOT a.attisdropped
        ORDER BY c.relname
    LOOP
        was_valid := true;
        FOR con IN
            SELECT conname, convalidated FROM pg_constraint
            WHERE conrelid = rel AND contype = 'c'
              AND pg_get_constraintdef(oid) LIKE '%^[a-z][a-z0-9]{0,39}$%'
        LOOP
            was_valid := was_valid AND con.convalidated;
            EXECUTE format('ALTER TABLE %s DROP CONSTRAINT %I', rel, con.conname);
        END LOOP;
        CONTINUE WHEN EXISTS (SELECT 1 FROM pg_constraint
                              WHERE conrelid = rel AND conname = 'tenant_id_valid');
        EXECUTE format($f$ALTER TABLE %s ADD CONSTRAINT tenant_id_valid
            CHECK (tenant_id ~ '^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$') NOT VALID$f$, rel);
        IF was_valid THEN
            EXECUTE format('ALTER TABLE %s VALIDATE CONSTRAINT tenant_id_valid', rel);
        END IF;
    END LOOP;
END
$$;
