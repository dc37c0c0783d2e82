-- Sluice's schema: products, releases and their signatures, channels with their
-- history, devices and their events, people and API tokens, and the audit log.

CREATE TABLE users (
    id            uuid PRIMARY KEY,
    username      text NOT NULL,
    password_hash text NOT NULL,
    role          text NOT NULL CHECK (role IN ('admin', 'viewer')),
    created_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT users_username_key UNIQUE (username)
);

-- API tokens are JWTs whose `jti` is this row's id; setting `revoked_at`
-- revokes one, and every request checks it.
CREATE TABLE api_tokens (
    id          uuid PRIMARY KEY,
    name        text NOT NULL,
    role        text NOT NULL CHECK (role IN ('publisher', 'admin', 'viewer')),
    products    text[] NOT NULL DEFAULT '{}',
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    expires_at  timestamptz,
    revoked_at  timestamptz
);

CREATE TABLE products (
    id                      uuid PRIMARY KEY,
    name                    text NOT NULL,
    repository              text NOT NULL,
    description             text,
    -- SHA-256 of the enrollment secret: the secret itself is shown once.
    enrollment_secret_hash  bytea NOT NULL,
    created_at              timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT products_name_key UNIQUE (name)
);

CREATE TABLE releases (
    id          uuid PRIMARY KEY,
    product_id  uuid NOT NULL REFERENCES products(id),
    version     text NOT NULL,
    -- The digest the published reference resolved to: a manifest or an index.
    digest      text NOT NULL,
    media_type  text NOT NULL,
    -- [{os, architecture, variant?, digest, size}], one entry per platform manifest.
    platforms   jsonb NOT NULL,
    metadata    jsonb NOT NULL DEFAULT '{}',
    floor       boolean NOT NULL DEFAULT false,
    state       text NOT NULL DEFAULT 'active' CHECK (state IN ('active', 'revoked')),
    publisher   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz,
    CONSTRAINT releases_product_version_key UNIQUE (product_id, version)
);

-- One cosign signature per signed digest (each platform manifest and the index).
CREATE TABLE signatures (
    release_id  uuid NOT NULL REFERENCES releases(id),
    digest      text NOT NULL,
    key_id      text NOT NULL,
    payload     text NOT NULL,
    signature   text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (release_id, digest, key_id)
);

-- Every channel change takes the next serial, so serials only grow across the
-- whole server and a device switching channels never sees one go down.
CREATE SEQUENCE channel_serial;

CREATE TABLE channels (
    id                  uuid PRIMARY KEY,
    product_id          uuid NOT NULL REFERENCES products(id),
    name                text NOT NULL,
    description         text,
    head_release_id     uuid REFERENCES releases(id),
    base_release_id     uuid REFERENCES releases(id),
    percent             double precision NOT NULL DEFAULT 0,
    ramp_from_percent   double precision,
    ramp_to_percent     double precision,
    ramp_over_minutes   double precision,
    ramp_started_at     timestamptz,
    paused              boolean NOT NULL DEFAULT false,
    paused_reason       text,
    paused_at           timestamptz,
    -- The head was set by an explicit rollback: devices may move down to it.
    downgrade           boolean NOT NULL DEFAULT false,
    gate_max_failure_percent double precision NOT NULL DEFAULT 20,
    gate_min_reports    integer NOT NULL DEFAULT 10,
    serial              bigint NOT NULL DEFAULT nextval('channel_serial'),
    created_at          timestamptz NOT NULL DEFAULT now(),
    updated_at          timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT channels_product_name_key UNIQUE (product_id, name)
);

CREATE TABLE channel_history (
    id          bigserial PRIMARY KEY,
    channel_id  uuid NOT NULL REFERENCES channels(id),
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    reason      text,
    before      jsonb,
    after       jsonb
);
CREATE INDEX channel_history_channel ON channel_history (channel_id, id);

CREATE TABLE devices (
    id              uuid PRIMARY KEY,
    product_id      uuid NOT NULL REFERENCES products(id),
    machine_id      text NOT NULL,
    channel         text NOT NULL,
    arch            text NOT NULL,
    labels          jsonb NOT NULL DEFAULT '{}',
    current_version text,
    current_digest  text,
    booted_slot     text,
    status          text NOT NULL DEFAULT 'idle' CHECK (status IN
                      ('idle', 'downloading', 'applying', 'rebooting', 'healthy', 'failed', 'rolled_back')),
    -- The version the last status report was about (what failed, what is being applied).
    status_version  text,
    last_seen       timestamptz NOT NULL DEFAULT now(),
    -- A pin overrides the channel: a release version, or an image reference
    -- resolved to a digest and signed when the pin was set.
    pin_version     text,
    pin_image       text,
    pin_digest      text,
    -- For an image pin: [{os, architecture, variant?, digest, size, signature}].
    pin_platforms   jsonb,
    created_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT devices_product_machine_key UNIQUE (product_id, machine_id)
);
CREATE INDEX devices_product_channel ON devices (product_id, channel);
CREATE INDEX devices_last_seen ON devices (last_seen);

CREATE TABLE device_events (
    id          bigserial PRIMARY KEY,
    device_id   uuid NOT NULL REFERENCES devices(id),
    at          timestamptz NOT NULL DEFAULT now(),
    kind        text NOT NULL CHECK (kind IN
                  ('download_started', 'downloaded', 'applied', 'rebooting', 'healthy', 'failed', 'rolled_back')),
    version     text,
    digest      text,
    message     text
);
CREATE INDEX device_events_device ON device_events (device_id, id);

CREATE TABLE audit_log (
    id          bigserial PRIMARY KEY,
    at          timestamptz NOT NULL DEFAULT now(),
    actor       text NOT NULL,
    action      text NOT NULL,
    target      text NOT NULL,
    before      jsonb,
    after       jsonb
);
CREATE INDEX audit_log_target ON audit_log (target, id);
