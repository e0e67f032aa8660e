-- Image metadata; the bytes live in the blob store, addressed by sha256.
CREATE TABLE images (
    id uuid PRIMARY KEY,
    filename text NOT NULL,
    content_type text NOT NULL,
    format text NOT NULL CHECK (format IN ('PNG', 'JPEG', 'WEBP')),
    width integer NOT NULL CHECK (width > 0),
    height integer NOT NULL CHECK (height > 0),
    channels smallint NOT NULL CHECK (channels BETWEEN 1 AND 4),
    bit_depth smallint NOT NULL CHECK (bit_depth IN (8, 16)),
    size_bytes bigint NOT NULL CHECK (size_bytes > 0),
    sha256 text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    thumbnail_sha256 text CHECK (thumbnail_sha256 ~ '^[0-9a-f]{64}$'),
    thumbnail_content_type text NOT NULL DEFAULT '',
    labels jsonb NOT NULL DEFAULT '{}'::jsonb,
    idempotency_key text UNIQUE,
    -- clock_timestamp, not now(): rows inserted by one long transaction still get distinct times.
    created_at timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Keyset pagination, newest first.
CREATE INDEX images_created_at_id ON images (created_at DESC, id DESC);
-- Reference counting of blobs (originals and thumbnails share one namespace).
CREATE INDEX images_sha256 ON images (sha256);
CREATE INDEX images_thumbnail_sha256 ON images (thumbnail_sha256) WHERE thumbnail_sha256 IS NOT NULL;
