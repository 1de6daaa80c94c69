-- Anthropic prices cache writes kept for one hour at twice the input rate, those kept for
-- five minutes at 1.25 times. The 1-hour part of cache_creation_input_tokens is recorded as
-- its own sub-bucket (a subset, like reasoning_tokens of output_tokens) so the ledger shows
-- what was priced at which rate. NULL: the provider did not split its cache writes.
ALTER TABLE llm_calls ADD COLUMN cache_creation_1h_input_tokens bigint
    CHECK (cache_creation_1h_input_tokens >= 0);
ALTER TABLE executions ADD COLUMN cache_creation_1h_input_tokens bigint
    CHECK (cache_creation_1h_input_tokens >= 0);
ALTER TABLE jobs ADD COLUMN cache_creation_1h_input_tokens bigint
    CHECK (cache_creation_1h_input_tokens >= 0);

-- Costs from the operator's price overrides (tallyd --prices) name their source.
ALTER TABLE llm_calls DROP CONSTRAINT llm_calls_cost_source_check,
    ADD CONSTRAINT llm_calls_cost_source_check CHECK (cost_source IN
        ('provider', 'sdk_estimate', 'price_table', 'price_override', 'unpriced', 'local'));
ALTER TABLE executions DROP CONSTRAINT executions_cost_source_check,
    ADD CONSTRAINT executions_cost_source_check CHECK (cost_source IN
        ('provider', 'sdk_estimate', 'price_table', 'price_override', 'unpriced', 'local'));
