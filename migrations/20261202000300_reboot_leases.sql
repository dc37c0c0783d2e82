-- Reboot leases (issue 18): a counting semaphore per group, spoken as the
-- FleetLock protocol. A Sluice device's group comes from its channel's
-- reboot policy (`<product>.<channel>[.<label value>]`); other FleetLock
-- clients (Zincati) use the groups an admin configures here.

-- One held lease. Times come from the server's clock, not the database's,
-- so an expired lease is one whose `expires_at` passed by that clock.
CREATE TABLE reboot_leases (
    group_name  text NOT NULL,
    holder      text NOT NULL,
    acquired_at timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL,
    PRIMARY KEY (group_name, holder)
);

-- A group for FleetLock clients that are not Sluice devices: the secret in
-- their `base_url` names it (only its SHA-256 is kept).
CREATE TABLE fleetlock_groups (
    name          text PRIMARY KEY CHECK (name ~ '^[a-zA-Z0-9.-]{1,128}$'),
    max_holders   integer NOT NULL CHECK (max_holders BETWEEN 1 AND 10000),
    ttl_minutes   integer NOT NULL CHECK (ttl_minutes BETWEEN 1 AND 1440),
    secret_sha256 bytea NOT NULL UNIQUE,
    created_at    timestamptz NOT NULL DEFAULT now()
);
