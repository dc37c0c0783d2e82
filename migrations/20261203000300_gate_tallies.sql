-- The health gate's counts, kept as devices change (issue 17's capacity
-- model): the gate asked, on every outcome a device reported, for a count
-- over the channel's devices, which at 10 M devices took seconds. Now it
-- reads one row. A device counts for (product, channel, status_version)
-- when its last report was about an offer (status_offered) and was an
-- outcome; a failure when that outcome was `failed` or `rolled_back` (the
-- names of EventKind::OUTCOMES and ::FAILURES, which a test keeps in step).
-- Triggers keep the tallies for every write to devices, whichever path
-- makes it (events, check-ins moving channels, reset, delete, SQL by hand).
-- They update a tally row per device written: a bulk load of millions of
-- devices in one transaction should disable them (ALTER TABLE devices
-- DISABLE TRIGGER USER) and rebuild the tallies: SELECT gate_tallies_rebuild().
CREATE TABLE gate_tallies (
    product_id uuid   NOT NULL,
    channel    text   NOT NULL,
    version    text   NOT NULL,
    reports    bigint NOT NULL DEFAULT 0,
    failures   bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (product_id, channel, version)
);

CREATE FUNCTION gate_tally_add(p uuid, c text, v text, offered boolean, s text, sign int)
RETURNS void LANGUAGE plpgsql AS $$
BEGIN
    IF v IS NULL OR NOT offered OR s NOT IN ('healthy', 'failed', 'rolled_back') THEN
        RETURN;
    END IF;
    INSERT INTO gate_tallies AS t (product_id, channel, version, reports, failures)
    VALUES (p, c, v, sign, CASE WHEN s IN ('failed', 'rolled_back') THEN sign ELSE 0 END)
    ON CONFLICT (product_id, channel, version) DO UPDATE
        SET reports = t.reports + EXCLUDED.reports, failures = t.failures + EXCLUDED.failures;
END $$;

-- An update touches its two tally rows in key order, so two devices moving
-- opposite ways at once (one to the head, one rolled back) wait for each
-- other instead of deadlocking.
CREATE FUNCTION gate_tally_devices() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        PERFORM gate_tally_add(OLD.product_id, OLD.channel, OLD.status_version, OLD.status_offered, OLD.status, -1);
    ELSIF TG_OP = 'INSERT' THEN
        PERFORM gate_tally_add(NEW.product_id, NEW.channel, NEW.status_version, NEW.status_offered, NEW.status, 1);
    ELSIF ROW(OLD.product_id, OLD.channel, coalesce(OLD.status_version, ''))
          <= ROW(NEW.product_id, NEW.channel, coalesce(NEW.status_version, '')) THEN
        PERFORM gate_tally_add(OLD.product_id, OLD.channel, OLD.status_version, OLD.status_offered, OLD.status, -1);
        PERFORM gate_tally_add(NEW.product_id, NEW.channel, NEW.status_version, NEW.status_offered, NEW.status, 1);
    ELSE
        PERFORM gate_tally_add(NEW.product_id, NEW.channel, NEW.status_version, NEW.status_offered, NEW.status, 1);
        PERFORM gate_tally_add(OLD.product_id, OLD.channel, OLD.status_version, OLD.status_offered, OLD.status, -1);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER devices_gate_insert AFTER INSERT ON devices
    FOR EACH ROW EXECUTE FUNCTION gate_tally_devices();
-- Only when what the tally reads changed: a check-in (last seen, the same
-- channel) costs no function call.
CREATE TRIGGER devices_gate_update AFTER UPDATE ON devices FOR EACH ROW
    WHEN (OLD.product_id IS DISTINCT FROM NEW.product_id OR OLD.channel IS DISTINCT FROM NEW.channel
          OR OLD.status_version IS DISTINCT FROM NEW.status_version
          OR OLD.status_offered IS DISTINCT FROM NEW.status_offered OR OLD.status IS DISTINCT FROM NEW.status)
    EXECUTE FUNCTION gate_tally_devices();
CREATE TRIGGER devices_gate_delete AFTER DELETE ON devices
    FOR EACH ROW EXECUTE FUNCTION gate_tally_devices();

-- Counts every tally anew from the devices: here, and after a bulk load
-- made with the triggers off.
CREATE FUNCTION gate_tallies_rebuild() RETURNS void LANGUAGE sql AS $$
    DELETE FROM gate_tallies;
    INSERT INTO gate_tallies (product_id, channel, version, reports, failures)
    SELECT product_id, channel, status_version, count(*),
           count(*) FILTER (WHERE status IN ('failed', 'rolled_back'))
    FROM devices
    WHERE status_offered AND status_version IS NOT NULL AND status IN ('healthy', 'failed', 'rolled_back')
    GROUP BY product_id, channel, status_version;
$$;
SELECT gate_tallies_rebuild();
