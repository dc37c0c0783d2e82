-- Device identities: each device's own Ed25519 key (enrollment proves it,
-- renewals sign with it), revocation and admin resets, the proofs seen
-- recently (so none is replayed), and the offers the health gate checks
-- outcome reports against.

ALTER TABLE devices
    -- The device's Ed25519 public key; NULL for a device enrolled before
    -- device keys (it binds one once with its old token) or after a reset.
    ADD COLUMN public_key bytea CHECK (public_key IS NULL OR length(public_key) = 32),
    ADD COLUMN key_bound_at timestamptz,
    -- Set by an admin's reset: the next enrollment of this machine id binds
    -- its key to this device. Without it the secret alone never rebinds a
    -- machine id that is already enrolled.
    ADD COLUMN rebind_allowed boolean NOT NULL DEFAULT false,
    -- Tokens issued before this are refused (a reset).
    ADD COLUMN tokens_not_before timestamptz,
    ADD COLUMN revoked_at timestamptz,
    ADD COLUMN revoked_reason text,
    -- The last few `<version>@<digest>` the resolve path told this device to
    -- install: an outcome report counts for the health gate only for one of them.
    ADD COLUMN offered text[] NOT NULL DEFAULT '{}',
    -- Whether the last status report was about an offer. Reports made before
    -- this migration keep counting, as they did.
    ADD COLUMN status_offered boolean NOT NULL DEFAULT true;
ALTER TABLE devices ALTER COLUMN status_offered SET DEFAULT false;

-- The server holds the revoked and reset devices in memory and reloads them
-- every few seconds: this keeps that a lookup of the few such rows.
CREATE INDEX devices_revocations ON devices (id)
    WHERE revoked_at IS NOT NULL OR tokens_not_before IS NOT NULL;

-- Deleted devices, so their (short-lived) tokens stay refused after a restart.
CREATE TABLE device_tombstones (
    id          uuid PRIMARY KEY,
    deleted_at  timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_tombstones_deleted ON device_tombstones (deleted_at);

-- Proofs of possession seen within their validity window: a second use is a
-- replay. Ed25519 signatures are deterministic, so the signature names the proof.
CREATE TABLE device_proofs (
    signature   bytea PRIMARY KEY,
    seen_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX device_proofs_seen ON device_proofs (seen_at);
