-- Banned and trusted client addresses (protection modes).
CREATE TABLE access_list (
    ip VARCHAR(64) NOT NULL,
    kind VARCHAR(8) NOT NULL,
    until_at BIGINT NOT NULL,
    reason VARCHAR(255) NOT NULL,
    added_by VARCHAR(128) NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (ip, kind)
);
