-- Budgets: spend limits per label selector over a period, enforced at dispatch.
--
-- A budget matches a job when every label of its selector is among the job's labels ({}
-- matches every job). Its spend in a period is read from usage_hourly (the hourly rollups,
-- exact and current: written in the ingest transaction), so period boundaries fall on UTC
-- hours: time zones are limited to whole-hour offsets.
CREATE TABLE budgets (
    name               text PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 256),
    selector           jsonb NOT NULL DEFAULT '{}'::jsonb CHECK (jsonb_typeof(selector) = 'object'),
    limit_usd          numeric NOT NULL CHECK (limit_usd >= 0),
    limit_tokens       bigint CHECK (limit_tokens >= 0),
    period             text NOT NULL CHECK (period IN ('day', 'week', 'month', 'lifetime')),
    time_zone          text NOT NULL DEFAULT 'UTC',
    action             text NOT NULL CHECK (action IN ('hold', 'fail')),
    soft_ratio         numeric NOT NULL DEFAULT 0.8 CHECK (soft_ratio > 0 AND soft_ratio <= 1),
    -- Reserved for a job without its own budgetUsd (and its per-job cap).
    default_reservation_usd numeric NOT NULL CHECK (default_reservation_usd > 0),
    default_reservation_tokens bigint CHECK (default_reservation_tokens > 0),
    -- Jobs whose spec allows unpriced models are refused (their spend could not be counted).
    refuse_unpriced    boolean NOT NULL DEFAULT false,
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now()
);

-- What an offered attempt holds against each matching budget until it is decided: its
-- per-job cap (USD, and tokens for a budget with a token limit). The part it has already
-- spent is in usage_hourly, so only the rest counts as reserved.
CREATE TABLE budget_reservations (
    budget       text NOT NULL REFERENCES budgets (name) ON DELETE CASCADE,
    execution_id uuid NOT NULL REFERENCES executions (id) ON DELETE CASCADE,
    amount_usd   numeric NOT NULL CHECK (amount_usd >= 0),
    tokens       bigint CHECK (tokens >= 0),
    PRIMARY KEY (budget, execution_id)
);
CREATE INDEX budget_reservations_execution_idx ON budget_reservations (execution_id);

-- Why a queued job is held (NULL: it is not).
ALTER TABLE jobs ADD COLUMN hold_reason text;
