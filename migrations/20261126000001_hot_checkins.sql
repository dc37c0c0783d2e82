-- Every check-in rewrites a device's last_seen (batched, about once per poll).
-- With an index on last_seen each of those updates adds an entry to every
-- index of the table; without one, and with room left on each page, they are
-- heap-only (HOT) updates that touch no index at all. No query needs the
-- index: the device list's "not seen for" filter runs inside a scan in id
-- order, which this index never served.
DROP INDEX devices_last_seen;
ALTER TABLE devices SET (fillfactor = 75);
