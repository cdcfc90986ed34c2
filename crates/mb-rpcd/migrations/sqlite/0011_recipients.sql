-- Valid recipients for recipient verification in list mode (mb-recipient): one row per
-- pattern, stored lowercase: user@domain, *@domain (catch-all) or a local part with
-- the wildcards * and ? (sales-*@domain). The domain is kept apart so that mb-smtpd can
-- tell a domain with no entry at all (accepted, with a warning) from an unknown user.
-- Ids are never reused: the list's version (count and largest id) changes with it.
CREATE TABLE recipients (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    pattern VARCHAR(320) NOT NULL UNIQUE,
    domain VARCHAR(253) NOT NULL,
    comment TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
CREATE INDEX recipients_domain ON recipients (domain);
