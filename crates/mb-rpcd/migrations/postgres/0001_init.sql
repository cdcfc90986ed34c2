-- Configuration overrides set with mb-config, their audit trail, and the message log.
CREATE TABLE config_overrides (
    cfg_key VARCHAR(191) NOT NULL PRIMARY KEY,
    cfg_value TEXT NOT NULL,
    updated_at BIGINT NOT NULL,
    updated_by VARCHAR(128) NOT NULL
);

CREATE TABLE config_audit (
    id BIGSERIAL PRIMARY KEY,
    cfg_key VARCHAR(191) NOT NULL,
    action VARCHAR(16) NOT NULL,
    old_value TEXT,
    new_value TEXT,
    uid BIGINT NOT NULL,
    username VARCHAR(128) NOT NULL,
    at BIGINT NOT NULL
);
CREATE INDEX config_audit_key ON config_audit (cfg_key, id);

CREATE TABLE config_state (
    id BIGINT NOT NULL PRIMARY KEY,
    generation BIGINT NOT NULL
);
INSERT INTO config_state (id, generation) VALUES (1, 0);

CREATE TABLE message_events (
    id BIGSERIAL PRIMARY KEY,
    event_id VARCHAR(191) NOT NULL UNIQUE,
    node VARCHAR(191) NOT NULL,
    daemon VARCHAR(64) NOT NULL,
    at_ms BIGINT NOT NULL,
    queue_id VARCHAR(64) NOT NULL,
    message_id TEXT NOT NULL,
    client_ip VARCHAR(64) NOT NULL,
    client_name TEXT NOT NULL,
    helo TEXT NOT NULL,
    sender TEXT NOT NULL,
    recipients TEXT NOT NULL,
    size BIGINT NOT NULL,
    stage VARCHAR(32) NOT NULL,
    verdict VARCHAR(32) NOT NULL,
    score DOUBLE PRECISION NOT NULL,
    symbols TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX message_events_queue ON message_events (queue_id);
CREATE INDEX message_events_at ON message_events (at_ms);
