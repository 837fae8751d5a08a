-- The home page lists published movies newest first, a page at a time by
-- keyset (created_at, id) after the last one shown (docs/scale.md): this
-- index holds exactly those rows in that order, so a page costs its own
-- rows however deep it is and however large the catalog.
CREATE INDEX assets_published ON assets (created_at DESC, id DESC)
    WHERE state = 'published' AND withdrawn_at IS NULL;

-- "My movies" counts each movie's views sold and what they earned.
CREATE INDEX play_grants_asset ON play_grants (asset_id, state);
