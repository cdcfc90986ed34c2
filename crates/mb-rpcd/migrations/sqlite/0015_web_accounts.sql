-- Web accounts (mb-web's logins; not the SMTP AUTH accounts of `users`), their
-- sessions and the API keys. Times are Unix seconds, 0 meaning never. Lists (domains,
-- addresses) are stored one per line, lowercase.
CREATE TABLE web_accounts (
    name VARCHAR(191) NOT NULL PRIMARY KEY,
    -- Argon2id, PHC string form.
    password_hash VARCHAR(255) NOT NULL,
    -- admin, domain-admin or user.
    role VARCHAR(16) NOT NULL,
    domains TEXT NOT NULL,
    addresses TEXT NOT NULL,
    -- The SMTP AUTH account whose login and aliases are this user's addresses too.
    smtp_user VARCHAR(191) NOT NULL,
    -- TOTP secrets sealed with the key in paths.data_dir/web-totp.key (AES-256-GCM,
    -- hex nonce and ciphertext): the database alone does not reveal them. Empty: none.
    totp_secret TEXT NOT NULL,
    -- A secret offered at a first login and not yet confirmed with a code.
    totp_pending TEXT NOT NULL,
    -- The last 30-second step a code was accepted for: a code is good once.
    totp_last_step BIGINT NOT NULL,
    failed_count BIGINT NOT NULL,
    failed_since BIGINT NOT NULL,
    locked_until BIGINT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by VARCHAR(191) NOT NULL,
    updated_at BIGINT NOT NULL,
    last_login BIGINT NOT NULL
);

-- Only a SHA-256 of the session id (sent in the cookie) is stored.
CREATE TABLE web_sessions (
    id_hash VARCHAR(64) NOT NULL PRIMARY KEY,
    account VARCHAR(191) NOT NULL,
    csrf_token VARCHAR(64) NOT NULL,
    client_ip VARCHAR(64) NOT NULL,
    created_at BIGINT NOT NULL,
    expires_at BIGINT NOT NULL,
    last_seen BIGINT NOT NULL
);
CREATE INDEX web_sessions_account ON web_sessions (account);
CREATE INDEX web_sessions_expires ON web_sessions (expires_at);

-- API keys: `mbk_ID_SECRET`; only a SHA-256 of the secret is stored.
CREATE TABLE web_api_keys (
    id VARCHAR(32) NOT NULL PRIMARY KEY,
    secret_hash VARCHAR(64) NOT NULL,
    description VARCHAR(255) NOT NULL,
    role VARCHAR(16) NOT NULL,
    domains TEXT NOT NULL,
    addresses TEXT NOT NULL,
    created_at BIGINT NOT NULL,
    created_by VARCHAR(191) NOT NULL,
    expires_at BIGINT NOT NULL,
    revoked_at BIGINT NOT NULL,
    last_used BIGINT NOT NULL
);
