-- mb-log searches by recipient and sender without reading every event (issue 15).
--
-- Sender: compared whole, so an index serves it.
CREATE INDEX message_events_sender ON message_events (sender, at_ms);

-- Recipients are stored one per line in message_events.recipients; a search matches a
-- whole line with LIKE, which ignores ASCII case. This table holds one row per line,
-- compared with NOCASE (the same folding), so an index finds what the line match finds
-- (the query still checks the line match on the rows it finds). mb-rpcd writes it with
-- each event and deletes its rows with the events they belong to.
CREATE TABLE message_event_recipients (
    event_row INTEGER NOT NULL,
    recipient TEXT NOT NULL COLLATE NOCASE
);
WITH RECURSIVE split (event_row, recipient, rest, depth) AS (
    SELECT id, recipients, recipients || char(10), 0 FROM message_events
    UNION ALL
    SELECT event_row, substr(rest, 1, instr(rest, char(10)) - 1),
        substr(rest, instr(rest, char(10)) + 1), depth + 1
    FROM split WHERE rest <> ''
)
INSERT INTO message_event_recipients (event_row, recipient)
SELECT event_row, recipient FROM split WHERE depth > 0 AND recipient <> '';
CREATE INDEX message_event_recipients_recipient ON message_event_recipients (recipient);
CREATE INDEX message_event_recipients_event ON message_event_recipients (event_row);
