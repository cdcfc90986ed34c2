-- Policies (allow / block / score by sender, recipient or client network).
CREATE TABLE policies (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name VARCHAR(100) NOT NULL UNIQUE,
    priority BIGINT NOT NULL,
    object VARCHAR(16) NOT NULL,
    pattern VARCHAR(320) NOT NULL,
    direction VARCHAR(16) NOT NULL,
    action VARCHAR(16) NOT NULL,
    tag DOUBLE PRECISION,
    quarantine DOUBLE PRECISION,
    reject DOUBLE PRECISION,
    comment TEXT NOT NULL,
    created_at BIGINT NOT NULL
);
