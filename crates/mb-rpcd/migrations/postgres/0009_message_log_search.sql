-- mb-log searches by client address and Message-ID: both compared whole, so a plain
-- index serves them. Subjects are matched as substrings (within the time window).
CREATE INDEX message_events_client ON message_events (client_ip, at_ms);
CREATE INDEX message_events_message_id ON message_events (message_id);
