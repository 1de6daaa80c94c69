-- OpenTelemetry export (tally serve --otlp-endpoint): when each LLM call started, and which
-- decided attempts still wait to be exported.
--
-- llm_calls.started_at is the call's start on the daemon's clock (job:generation startedAt;
-- NULL from daemons that do not send it). Its end is started_at + duration_ms.
ALTER TABLE llm_calls ADD COLUMN started_at timestamptz;

-- executions.otlp_pending: the attempt's spans and data points have not reached the OTLP
-- endpoint yet. Rows that exist before this migration are not pending (their history is not
-- exported); every attempt from now on is, until an exporter marks it. A result or a call
-- recorded after the export marks it pending again, and it is sent again under the same
-- span ids. otlp_exported_at is when it was last exported.
ALTER TABLE executions
    ADD COLUMN otlp_pending boolean NOT NULL DEFAULT false,
    ADD COLUMN otlp_exported_at timestamptz;
ALTER TABLE executions ALTER COLUMN otlp_pending SET DEFAULT true;

-- The exporter's queue: decided attempts not yet exported, oldest first.
CREATE INDEX executions_otlp_pending_idx ON executions (finished_at)
    WHERE otlp_pending AND status IN ('succeeded', 'failed', 'lost', 'cancelled');
