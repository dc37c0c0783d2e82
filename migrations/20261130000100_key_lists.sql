-- Signed key lists (protocol/src/keylist.rs), one row per version: version
-- N+1 is signed by the root keys of version N, and the newest row says which
-- key of each role is current. The private keys stay in files.
CREATE TABLE key_lists (
    version     bigint PRIMARY KEY CHECK (version > 0),
    -- The DSSE envelope as served: the payload's exact bytes are in it, base64.
    envelope    jsonb NOT NULL,
    created_by  text NOT NULL,
    created_at  timestamptz NOT NULL DEFAULT now()
);

-- The newest key list version a device says it holds (NULL: none yet, or an
-- agent older than key lists): "devices that hold key K" counts from it.
ALTER TABLE devices ADD COLUMN keys_version bigint;
