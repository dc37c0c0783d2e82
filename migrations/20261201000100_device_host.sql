-- The host status a device sent with its latest event (slots, versions,
-- boot-count state, agent state), as the agent's `status --json` prints it.
ALTER TABLE devices ADD COLUMN host jsonb;
ALTER TABLE devices ADD COLUMN host_at timestamptz;
