-- The secret session and API tokens are signed with (HS256), in the database
-- (issue 17) so a token one server issued is accepted by every other server
-- behind the balancer. Sealed with SLUICE_KEY_PASSPHRASE like the signing
-- keys: Argon2id makes a key from the passphrase and the row's salt, and
-- AES-256-GCM seals the secret with it, so the database alone cannot mint a
-- token. One row per secret; `jwt` is the only one today.
CREATE TABLE server_secrets (
    name          text PRIMARY KEY,
    sealed        text NOT NULL,
    -- The file it came from (`<data_dir>/jwt.key` of a server from before).
    imported_from text,
    created_at    timestamptz NOT NULL DEFAULT now()
);
