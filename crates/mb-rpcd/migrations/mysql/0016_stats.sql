-- Statistics rollups (issue 16 item 4), fed by mb-rpcd in the transaction that stores
-- each new message event (stats.rs), pruned after stats.retention_days.
--
-- The direction of a message (inbound or outbound) as the daemon that decided on it
-- saw it; empty for events stored before this migration and for stages that carry none.
ALTER TABLE message_events ADD COLUMN direction VARCHAR(16) NOT NULL DEFAULT '';

-- One row per hour (Unix seconds of its start, UTC), scope (empty: every message; else
-- one of the message's own domains: recipients' for inbound, the sender's for outbound),
-- direction, stage and verdict of the deciding events.
CREATE TABLE stats_counts (
    hour_start BIGINT NOT NULL,
    scope VARCHAR(255) NOT NULL,
    direction VARCHAR(16) NOT NULL,
    stage VARCHAR(32) NOT NULL,
    verdict VARCHAR(32) NOT NULL,
    messages BIGINT NOT NULL,
    recipients BIGINT NOT NULL,
    bytes BIGINT NOT NULL,
    viruses BIGINT NOT NULL,
    PRIMARY KEY (hour_start, scope, direction, stage, verdict)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

-- Messages per hour, scope, dimension (sender, recipient, client, sender_domain) and
-- value. Every value is counted while its hour runs; once the hour is over the rows
-- beyond the top 100 of each (hour, scope, dimension) are dropped (stats_state).
CREATE TABLE stats_top (
    hour_start BIGINT NOT NULL,
    scope VARCHAR(255) NOT NULL,
    dimension VARCHAR(16) NOT NULL,
    item VARCHAR(320) NOT NULL,
    messages BIGINT NOT NULL,
    PRIMARY KEY (hour_start, scope, dimension, item)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

-- The last hour whose top tables were cut to their top 100 (Unix seconds; 0: none).
CREATE TABLE stats_state (
    id INTEGER NOT NULL PRIMARY KEY,
    trimmed_through BIGINT NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
INSERT INTO stats_state (id, trimmed_through) VALUES (1, 0);
