-- The subject in the message log, and the quarantine index.
ALTER TABLE message_events ADD COLUMN subject TEXT;

CREATE TABLE quarantine (
    id VARCHAR(64) NOT NULL PRIMARY KEY,
    node VARCHAR(191) NOT NULL,
    at_ms BIGINT NOT NULL,
    queue_id VARCHAR(64) NOT NULL,
    client_ip VARCHAR(64) NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    subject TEXT NOT NULL,
    reason TEXT NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    symbols TEXT NOT NULL,
    size BIGINT NOT NULL,
    path VARCHAR(255) NOT NULL
);
CREATE INDEX quarantine_at ON quarantine (at_ms);
