-- The resolve snapshot loads a product's pinned devices every few seconds:
-- with this partial index that is a lookup of the few pinned rows, not a scan
-- of the whole fleet.
CREATE INDEX devices_pinned ON devices (product_id)
    WHERE pin_version IS NOT NULL OR pin_image IS NOT NULL;
