-- mb-log searches by subject, recipient and sender without reading every event (issue
-- 15). A scan of message_events reads wide rows under a case-insensitive collation:
-- over a million events that took 3 to 4 seconds.
--
-- Sender: compared whole, so an index serves it (a prefix of the TEXT column; the
-- comparison still checks the whole value).
CREATE INDEX message_events_sender ON message_events (sender(191), at_ms);

-- Recipients are stored one per line in message_events.recipients; a search matches a
-- whole line. This table holds one row per line, in the events' collation so that an
-- indexed comparison finds what the line match finds (the query still checks the line
-- match on the rows it finds). mb-rpcd writes it with each event and deletes its rows
-- with the events they belong to.
CREATE TABLE message_event_recipients (
    id BIGINT NOT NULL AUTO_INCREMENT PRIMARY KEY,
    event_row BIGINT NOT NULL,
    recipient TEXT NOT NULL
) CHARACTER SET utf8mb4 COLLATE utf8mb4_unicode_ci;
INSERT INTO message_event_recipients (event_row, recipient)
WITH RECURSIVE split (event_row, recipient, rest, depth) AS (
    SELECT id, recipients, CONCAT(recipients, CHAR(10)), 0 FROM message_events
    UNION ALL
    SELECT event_row, SUBSTRING(rest, 1, LOCATE(CHAR(10), rest) - 1),
        SUBSTRING(rest, LOCATE(CHAR(10), rest) + 1), depth + 1
    FROM split WHERE rest <> ''
)
SELECT event_row, recipient FROM split WHERE depth > 0 AND recipient <> '';
CREATE INDEX message_event_recipients_recipient ON message_event_recipients (recipient(191));
CREATE INDEX message_event_recipients_event ON message_event_recipients (event_row);

-- Subject: a case-insensitive substring, which no B-tree index and no word-based
-- FULLTEXT index answers. Each row holds the lower-cased subjects of 16 consecutive
-- events (ids 16 * chunk to 16 * chunk + 15), one per line, as bytes: a byte search of
-- these few, short rows finds the chunks that can hold a match, and only their events
-- are read and checked (per-trigram postings, as pg_trgm keeps, came to a gigabyte and
-- six minutes of inserts for a million events). The width 16 is also written in
-- mb-rpcd's message_log.rs. mb-rpcd appends to a chunk with each event and deletes the
-- chunks whose events are all gone.
CREATE TABLE message_event_subject_chunks (
    chunk BIGINT NOT NULL PRIMARY KEY,
    body MEDIUMBLOB NOT NULL
);
SET SESSION group_concat_max_len = 16777216;
INSERT INTO message_event_subject_chunks (chunk, body)
SELECT id DIV 16, GROUP_CONCAT(LOWER(COALESCE(subject, '')) ORDER BY id SEPARATOR '\n')
FROM message_events GROUP BY id DIV 16;
