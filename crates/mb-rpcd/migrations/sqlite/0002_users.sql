-- Accounts for SMTP AUTH (Argon2id hashes in PHC string form).
CREATE TABLE users (
    username VARCHAR(191) NOT NULL PRIMARY KEY,
    password_hash VARCHAR(255) NOT NULL,
    created_at BIGINT NOT NULL,
    updated_at BIGINT NOT NULL
);
