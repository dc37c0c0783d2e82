-- Signing keys in the database (issue 17), so every server behind a balancer
-- signs with the same keys and a rotation through one reaches all. The
-- private half is cosign's encrypted PEM, sealed with SLUICE_KEY_PASSPHRASE
-- exactly as the files under `<data_dir>/keys` were: the database alone never
-- holds a usable key. Which key is next, current or retired is said by the
-- newest row of `key_lists`; a revoked key keeps its row (for forensics) and
-- is never loaded again.
CREATE TABLE signing_keys (
    key_id        text PRIMARY KEY,
    role          text NOT NULL CHECK (role IN ('image', 'response', 'root')),
    encrypted_pem text NOT NULL,
    -- The key file it came from, for a key imported from a data folder.
    imported_from text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    revoked_at    timestamptz
);
