-- A worker that dies takes every dispatch it holds with it, so RabbitMQ's delivery count of a dispatch also
-- counts crashes caused by OTHER jobs. To tell the job that crashes its workers from its collateral, count
-- the claims of the current attempt and the dead letters the job has had.

ALTER TABLE jobs ADD COLUMN attempt_claims integer NOT NULL DEFAULT 0;
ALTER TABLE jobs ADD COLUMN dead_letters integer NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION jobs_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := clock_timestamp();
    IF NEW.attempt <> OLD.attempt THEN
        NEW.attempt_claims := 0;
    END IF;
    RETURN NEW;
END $$;
