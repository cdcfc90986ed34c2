-- Greylisting (greylist.*), when redis.url is not set: one row per triplet (client
-- network, lower-cased sender, lower-cased recipient) and one per client network that
-- has passed, for auto-whitelisting. Times are Unix seconds; expires_at lets the
-- pruning pass and the checks find what may be forgotten.
CREATE TABLE greylist_triplets (
    network VARCHAR(64) NOT NULL,
    sender VARCHAR(255) NOT NULL,
    recipient VARCHAR(255) NOT NULL,
    first_seen BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    passed BIGINT NOT NULL,
    attempts BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    PRIMARY KEY (network, sender, recipient)
);
CREATE INDEX greylist_triplets_expires ON greylist_triplets (expires_at);
CREATE TABLE greylist_clients (
    network VARCHAR(64) NOT NULL PRIMARY KEY,
    passes BIGINT NOT NULL,
    last_seen BIGINT NOT NULL,
    expires_at BIGINT NOT NULL
);
CREATE INDEX greylist_clients_expires ON greylist_clients (expires_at);
