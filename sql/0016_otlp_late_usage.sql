-- OpenTelemetry export of late usage (issue 25): an offer that timed out (`rejected`) whose
-- daemon ran it anyway and reported calls or a result is exported like a decided attempt.
--
-- The export queue's partial index now also holds rejected offers. The exporter sends those
-- that reported usage and marks the others (declined, or timed out and never run) without
-- sending anything. The predicate names the same columns as before (none that recording a
-- call changes), and an orchestrator of the previous release, which asks for the four
-- decided states, still reads this index. Offers rejected since migration 0012 enter the
-- queue with it: those decided within --otlp-backlog-hours are marked (or, with late usage,
-- exported) by the exporter's first passes, older ones skipped as any old attempt is.
DROP INDEX executions_otlp_pending_idx;
CREATE INDEX executions_otlp_pending_idx ON executions (finished_at)
    WHERE otlp_pending AND status IN ('succeeded', 'failed', 'lost', 'cancelled', 'rejected');
