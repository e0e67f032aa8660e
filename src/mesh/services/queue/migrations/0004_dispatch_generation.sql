-- A dead letter whose ack was lost after its commit comes back, and without a way to tell it from a fresh
-- one it counted twice: a collateral job was dispatched once more and went DEAD one dead letter early.
-- Each dispatch now carries the job's dead-letter count when it was written (its generation within the
-- attempt); a dead letter of an earlier generation is stale.

ALTER TABLE outbox ADD COLUMN dead_letters integer NOT NULL DEFAULT 0;

CREATE OR REPLACE FUNCTION jobs_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.state IS DISTINCT FROM NEW.state THEN
        INSERT INTO job_history (job_id, from_state, to_state, attempt, reason, next_run_at)
        VALUES (NEW.id, CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END, NEW.state, NEW.attempt,
                NEW.state_reason, NEW.next_run_at);
    END IF;
    IF NEW.state = 'QUEUED' AND (TG_OP = 'INSERT' OR OLD.state <> 'QUEUED' OR OLD.attempt <> NEW.attempt
                                 OR OLD.dispatched_at <> NEW.dispatched_at) THEN
        INSERT INTO outbox (job_id, attempt, queue, priority, traceparent, tracestate, dead_letters)
        VALUES (NEW.id, NEW.attempt, NEW.queue, NEW.priority, NEW.traceparent, NEW.tracestate,
                NEW.dead_letters);
    END IF;
    RETURN NULL;
END $$;
