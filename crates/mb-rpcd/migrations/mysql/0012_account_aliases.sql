-- Sender addresses granted to SMTP AUTH accounts beyond their own login (sender
-- binding): an address, or '@domain' for every address of a domain. Lowercase.
CREATE TABLE user_aliases (
    username VARCHAR(191) NOT NULL,
    address VARCHAR(255) NOT NULL,
    created_at BIGINT NOT NULL,
    PRIMARY KEY (username, address)
) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
