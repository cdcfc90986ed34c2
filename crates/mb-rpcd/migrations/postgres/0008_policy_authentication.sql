-- A sender-based allow policy applies only when the sender is authenticated (SPF pass
-- for its domain, or a DKIM pass aligned with the From domain), unless the policy sets
-- unauthenticated. 0/1 rather than a BOOLEAN: sqlx's Any driver reads one integer type
-- the same way from every dialect. Existing policies get 0: authenticated-only.
ALTER TABLE policies ADD COLUMN unauthenticated BIGINT NOT NULL DEFAULT 0;

-- The sender allow policies this upgrade made authenticated-only; mb-rpcd logs each
-- one at its next start and then empties the table.
CREATE TABLE policy_upgrades (
    name VARCHAR(100) NOT NULL
);
INSERT INTO policy_upgrades (name)
    SELECT name FROM policies
    WHERE action = 'allow'
      AND object IN ('address', 'domain')
      AND direction IN ('from', 'from-or-to');
