-- API keys of the gateway: only the SHA-256 of each key is stored; the key itself is shown once, at creation.
CREATE TABLE gateway_api_keys (
    id uuid PRIMARY KEY,
    name text NOT NULL,
    key_hash text NOT NULL UNIQUE,
    prefix text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    revoked_at timestamptz
);
CREATE INDEX gateway_api_keys_name ON gateway_api_keys (name);
