-- Indexes no query reads. Every recorded result moves its execution and its job to new row
-- versions (status and totals change), which inserts into every index of both tables, so an
-- unused index is paid for on the ledger's hot path. Reports filter on
-- coalesce(finished_at, offered_at) through the usage_ledger view and `tally jobs` orders by
-- created_at, neither of which these serve.
DROP INDEX executions_finished_at_idx;
DROP INDEX jobs_finished_at_idx;
DROP INDEX jobs_model_idx;
