-- Agent jobs that do real work: the tool calls an agent loop answered, and what it answered.
--
-- tool_calls holds one row per job:tool frame, idempotent on (execution_id, seq) like
-- llm_calls: a redelivered frame is recognised, never stored twice. Only the call's shape is
-- kept (name, when, how long, the sizes of its arguments and result, error or not), never the
-- arguments or the result themselves.
CREATE TABLE tool_calls (
    execution_id    uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    seq             integer NOT NULL CHECK (seq >= 0),
    name            text NOT NULL,
    -- The llm_calls.seq whose response asked for the tool (NULL: before any call).
    after_call      integer CHECK (after_call >= 0),
    started_at      timestamptz NOT NULL,
    duration_ms     double precision NOT NULL CHECK (duration_ms >= 0),
    arguments_bytes bigint NOT NULL CHECK (arguments_bytes >= 0),
    result_bytes    bigint NOT NULL CHECK (result_bytes >= 0),
    error           boolean NOT NULL DEFAULT false,
    recorded_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (execution_id, seq)
);

CREATE INDEX tool_calls_recorded_at_idx ON tool_calls (recorded_at);

-- The attempt's answer: text, or the JSON text of an object (output_format 'json'), cut to
-- the orchestrator's --max-output-bytes (output_truncated).
ALTER TABLE executions
    ADD COLUMN output text,
    ADD COLUMN output_format text CHECK (output_format IN ('text', 'json')),
    ADD COLUMN output_truncated boolean NOT NULL DEFAULT false;
