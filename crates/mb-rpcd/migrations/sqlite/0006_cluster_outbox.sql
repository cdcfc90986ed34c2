-- What a cluster child owes the main: message-log events stored and quarantine entries
-- added ('quarantined') or removed ('unquarantined'), in order, until acknowledged.
CREATE TABLE cluster_outbox (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    kind VARCHAR(16) NOT NULL,
    ref_id VARCHAR(191) NOT NULL
);
