-- The channel's mark that its head was set by a rollback (devices may move
-- down to it) was named `downgrade`, a word the resolve answer uses for a
-- device's move down: name the mark for what it records.
ALTER TABLE channels RENAME COLUMN downgrade TO rolled_back;
