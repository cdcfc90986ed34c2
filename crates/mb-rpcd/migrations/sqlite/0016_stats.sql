-- Statistics rollups (issue 16 item 4), fed by mb-rpcd in the transaction that stores
-- each new message event (stats.rs), pruned after stats.retention_days.
--
-- The direction of a message (inbound or outbound) as the daemon that decided on it
-- saw it; empty for events stored before this migration and for stages that carry none.
ALTER TABLE message_events ADD COLUMN direction TEXT NOT NULL DEFAULT '';

-- One row per hour (Unix seconds of its start, UTC), scope (empty: every message; else
-- one of the message's own domains: recipients' for inbound, the sender's for outbound),
-- direction, stage and verdict of the deciding events.
CREATE TABLE stats_counts (
    hour_start BIGINT NOT NULL,
    scope TEXT NOT NULL,
    direction TEXT NOT NULL,
    stage TEXT NOT NULL,
    verdict TEXT NOT NULL,
    messages BIGINT NOT NULL,
    recipients BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    viruses BIGINT NOT NULL,
    PRIMARY KEY (hour_start, scope, direction, stage, verdict)
);

-- Messages per hour, scope, dimension (sender, recipient, client, sender_domain) and
-- value. Every value is counted while its hour runs; once the hour is over the rows
-- beyond the top 100 of each (hour, scope, dimension) are dropped (stats_state).
CREATE TABLE stats_top (
    hour_start BIGINT NOT NULL,
    scope TEXT NOT NULL,
    dimension TEXT NOT NULL,
    item TEXT NOT NULL,
    messages BIGINT NOT NULL,
    PRIMARY KEY (hour_start, scope, dimension, item)
);

-- The last hour whose top tables were cut to their top 100 (Unix seconds; 0: none).
CREATE TABLE stats_state (
    id INTEGER NOT NULL PRIMARY KEY,
    trimmed_through BIGINT NOT NULL
);
INSERT INTO stats_state (id, trimmed_through) VALUES (1, 0);
