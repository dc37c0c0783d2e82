-- Fleet policy (issue 18): rollouts in waves by label selector, a reboot
-- policy per channel (maintenance windows, reboot leases), urgent releases,
-- and the `staged` status of a device that wrote a release and waits for
-- that policy.

-- The waves a rollout proceeds in (`[{selector, percent, ramp_minutes,
-- hold_minutes}]`), and when the first started (moved forward by time spent
-- paused). NULL: no waves, the channel's percent and ramp apply.
ALTER TABLE channels ADD COLUMN waves jsonb;
ALTER TABLE channels ADD COLUMN waves_started_at timestamptz;
-- `{windows: [...], lease: {...}}`, as `PUT .../reboot-policy` takes it.
ALTER TABLE channels ADD COLUMN reboot_policy jsonb NOT NULL DEFAULT '{}';

-- An urgent release reboots devices outside their maintenance windows.
ALTER TABLE releases ADD COLUMN urgent boolean NOT NULL DEFAULT false;

-- Selectors filter the fleet by label.
CREATE INDEX devices_labels ON devices USING gin (labels jsonb_path_ops);

ALTER TABLE devices DROP CONSTRAINT devices_status_check;
ALTER TABLE devices ADD CONSTRAINT devices_status_check CHECK (status IN
    ('idle', 'downloading', 'applying', 'staged', 'rebooting', 'healthy', 'failed', 'rolled_back'));
ALTER TABLE device_events DROP CONSTRAINT device_events_kind_check;
ALTER TABLE device_events ADD CONSTRAINT device_events_kind_check CHECK (kind IN
    ('download_started', 'downloaded', 'applied', 'staged', 'rebooting', 'healthy', 'failed',
     'rolled_back', 'failure_cleared'));
