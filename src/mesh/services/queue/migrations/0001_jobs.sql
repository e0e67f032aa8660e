-- Jobs, their history and the dispatch outbox. PostgreSQL is the record; RabbitMQ only carries dispatches.

CREATE TABLE jobs (
    id                 uuid PRIMARY KEY,
    queue              text NOT NULL,
    state              text NOT NULL CHECK (state IN
                           ('QUEUED', 'RUNNING', 'RETRY_WAIT', 'SUCCEEDED', 'FAILED', 'DEAD', 'CANCELLED')),
    image_id           text NOT NULL,
    pipeline           bytea NOT NULL DEFAULT '',          -- mesh.queue.v1.Job with only `pipeline` set
    model              text NOT NULL DEFAULT '',
    priority           smallint NOT NULL DEFAULT 0 CHECK (priority BETWEEN 0 AND 9),
    idempotency_key    text UNIQUE,                        -- NULL when none was given
    attempt            integer NOT NULL DEFAULT 1,         -- the fencing token of dispatches
    run_first_attempt  integer NOT NULL DEFAULT 1,         -- a user's retry starts a new budget here
    max_attempts       integer NOT NULL CHECK (max_attempts >= 1),
    backoff_base_s     double precision NOT NULL,
    backoff_cap_s      double precision NOT NULL,
    executions         integer NOT NULL DEFAULT 0,         -- claims, counting duplicate executions
    progress           double precision NOT NULL DEFAULT 0,
    stage              text NOT NULL DEFAULT '',
    error_category     text,
    error_message      text,
    error_code         text,
    result             bytea,                              -- mesh.queue.v1.JobResult
    traceparent        text NOT NULL DEFAULT '',
    tracestate         text NOT NULL DEFAULT '',
    state_reason       text NOT NULL DEFAULT '',           -- why the last transition happened
    cancel_requested   boolean NOT NULL DEFAULT false,
    lease_owner        uuid,                               -- claim token of the worker holding it
    lease_expires_at   timestamptz,
    next_run_at        timestamptz,
    enqueued_at        timestamptz NOT NULL DEFAULT now(),
    dispatched_at      timestamptz NOT NULL DEFAULT now(),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    started_at         timestamptz,
    finished_at        timestamptz,
    version            bigint NOT NULL DEFAULT 1
);

-- Exact queue position: queued jobs of a queue ordered by priority (high first), then enqueue time.
CREATE INDEX jobs_queued_order ON jobs (queue, priority DESC, enqueued_at, id) WHERE state = 'QUEUED';
-- Listing newest first (keyset), with and without a state filter.
CREATE INDEX jobs_listing ON jobs (created_at DESC, id DESC);
CREATE INDEX jobs_state_listing ON jobs (state, created_at DESC, id DESC);
-- The reconciler's scans.
CREATE INDEX jobs_retry_due ON jobs (next_run_at) WHERE state = 'RETRY_WAIT';
CREATE INDEX jobs_leases ON jobs (lease_expires_at) WHERE state = 'RUNNING';
CREATE INDEX jobs_stale_queued ON jobs (dispatched_at) WHERE state = 'QUEUED';
-- Statistics.
CREATE INDEX jobs_queue_state ON jobs (queue, state);
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;

CREATE TABLE job_history (
    id           bigserial PRIMARY KEY,
    job_id       uuid NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    from_state   text,
    to_state     text NOT NULL,
    attempt      integer NOT NULL,
    reason       text NOT NULL DEFAULT '',
    next_run_at  timestamptz,
    at           timestamptz NOT NULL DEFAULT clock_timestamp()
);
CREATE INDEX job_history_by_job ON job_history (job_id, id);

-- Dispatches waiting for a publisher confirm. A relay locks rows for a while, publishes, and deletes them
-- after the confirm; rows whose lock ran out (a relay died mid-publish) are published again.
CREATE TABLE outbox (
    id            bigserial PRIMARY KEY,
    job_id        uuid NOT NULL,
    attempt       integer NOT NULL,
    queue         text NOT NULL,
    priority      smallint NOT NULL,
    traceparent   text NOT NULL DEFAULT '',
    tracestate    text NOT NULL DEFAULT '',
    created_at    timestamptz NOT NULL DEFAULT now(),
    locked_until  timestamptz NOT NULL DEFAULT '-infinity',
    publishes     integer NOT NULL DEFAULT 0
);
CREATE INDEX outbox_pending ON outbox (locked_until, priority DESC, id);

-- Every update bumps the version and the update time.
CREATE FUNCTION jobs_touch() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    NEW.updated_at := clock_timestamp();
    RETURN NEW;
END $$;

CREATE TRIGGER jobs_touch BEFORE UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_touch();

-- Every state change lands in the history, and every move into QUEUED (a new job, a retry, a requeue)
-- writes its dispatch into the outbox in the same transaction: a queued job always has a dispatch coming.
CREATE FUNCTION jobs_transition() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'INSERT' OR OLD.state IS DISTINCT FROM NEW.state THEN
        INSERT INTO job_history (job_id, from_state, to_state, attempt, reason, next_run_at)
        VALUES (NEW.id, CASE WHEN TG_OP = 'INSERT' THEN NULL ELSE OLD.state END, NEW.state, NEW.attempt,
                NEW.state_reason, NEW.next_run_at);
    END IF;
    IF NEW.state = 'QUEUED' AND (TG_OP = 'INSERT' OR OLD.state <> 'QUEUED' OR OLD.attempt <> NEW.attempt
                                 OR OLD.dispatched_at <> NEW.dispatched_at) THEN
        INSERT INTO outbox (job_id, attempt, queue, priority, traceparent, tracestate)
        VALUES (NEW.id, NEW.attempt, NEW.queue, NEW.priority, NEW.traceparent, NEW.tracestate);
    END IF;
    RETURN NULL;
END $$;

CREATE TRIGGER jobs_transition AFTER INSERT OR UPDATE ON jobs FOR EACH ROW EXECUTE FUNCTION jobs_transition();
