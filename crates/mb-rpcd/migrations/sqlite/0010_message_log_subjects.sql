-- `mb-log --subject` finds a substring of the subject, ignoring case: a full-text index
-- of the subjects' trigrams (FTS5, built into the bundled SQLite) answers that without
-- reading every event. It follows the events table through triggers.
CREATE VIRTUAL TABLE message_events_subject USING fts5(
    subject,
    content = 'message_events',
    content_rowid = 'id',
    tokenize = 'trigram'
);
INSERT INTO message_events_subject (message_events_subject) VALUES ('rebuild');
CREATE TRIGGER message_events_subject_insert AFTER INSERT ON message_events BEGIN
    INSERT INTO message_events_subject (rowid, subject) VALUES (new.id, new.subject);
END;
CREATE TRIGGER message_events_subject_delete AFTER DELETE ON message_events BEGIN
    INSERT INTO message_events_subject (message_events_subject, rowid, subject)
        VALUES ('delete', old.id, old.subject);
END;
