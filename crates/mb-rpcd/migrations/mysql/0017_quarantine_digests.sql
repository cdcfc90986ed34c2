-- Quarantine digests (quarantine.digest.*): when each recipient last had one, the
-- scheduler's last run (one row, so a restart does not send twice), and the links the
-- digests carry. Times are Unix milliseconds for quarantine times, Unix seconds
-- otherwise; 0 means never.
CREATE TABLE digest_recipients (
    recipient VARCHAR(255) NOT NULL PRIMARY KEY,
    -- The newest quarantine time (at_ms) a digest to this recipient listed.
    last_listed_ms BIGINT NOT NULL,
    last_sent BIGINT NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

CREATE TABLE digest_runs (
    id BIGINT NOT NULL PRIMARY KEY,
    -- The scheduled time of the last run the scheduler claimed.
    last_run BIGINT NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
INSERT INTO digest_runs (id, last_run) VALUES (1, 0);

-- A digest link: the token in the URL is ID.HMAC, the HMAC (key in
-- paths.data_dir/digest-link.key) covering every column that says what it does, so a
-- token is good only for its action, message, recipient and lifetime; used_at makes it
-- single-use.
CREATE TABLE digest_links (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    -- release or portal.
    action VARCHAR(16) NOT NULL,
    quarantine_id VARCHAR(128) NOT NULL,
    recipient VARCHAR(255) NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    used_at BIGINT NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
CREATE INDEX digest_links_expires ON digest_links (expires_at);

-- A policy scoped to one recipient (a user's own allow or block of a sender, from the
-- quarantine pages); empty for every recipient.
ALTER TABLE policies ADD COLUMN recipient VARCHAR(255) NOT NULL DEFAULT '';
