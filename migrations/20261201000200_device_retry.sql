-- Clearing a device's failed list (issue 13).
-- Digests an admin asked a device to try again: every answer to the device
-- carries them until it says it cleared them.
ALTER TABLE devices ADD COLUMN retry_digests text[] NOT NULL DEFAULT '{}';
-- `failure_cleared`: the device no longer holds a digest as failed (an
-- admin's retry, or `sluice-agent clear-failed` on the device).
ALTER TABLE device_events DROP CONSTRAINT device_events_kind_check;
ALTER TABLE device_events ADD CONSTRAINT device_events_kind_check CHECK (kind IN
    ('download_started', 'downloaded', 'applied', 'rebooting', 'healthy', 'failed',
     'rolled_back', 'failure_cleared'));
