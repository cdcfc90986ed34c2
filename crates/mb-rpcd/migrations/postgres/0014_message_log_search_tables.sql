-- mb-log searches by recipient and sender without reading every event (issue 15).
--
-- Sender: compared whole, so an index serves it.
CREATE INDEX message_events_sender ON message_events (sender, at_ms);

-- Recipients are stored one per line in message_events.recipients; a search matches a
-- whole line with LIKE. This table holds one row per line, so an index finds what the
-- line match finds (the query still checks the line match on the rows it finds).
-- mb-rpcd writes it with each event and deletes its rows with the events they belong to.
CREATE TABLE message_event_recipients (
    event_row BIGINT NOT NULL,
    recipient TEXT NOT NULL
);
INSERT INTO message_event_recipients (event_row, recipient)
SELECT id, r FROM message_events, unnest(string_to_array(recipients, chr(10))) AS r
WHERE r <> '';
CREATE INDEX message_event_recipients_recipient ON message_event_recipients (recipient);
CREATE INDEX message_event_recipients_event ON message_event_recipients (event_row);
