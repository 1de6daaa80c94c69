-- Budgets at their edges: the database refuses what no budget can enforce, and an attempt
-- whose usage is not known yet (lost, or an offer that timed out: its daemon may have started
-- it) keeps counting against its budgets and its job's limits.
--
-- Amounts are bounded by the wire's largest (1e9 USD). NaN passes `>= 0` (in PostgreSQL's
-- numeric order NaN sorts above every number) but not `<= 1e9`, nor does Infinity (numeric
-- has it from PostgreSQL 14; a bound written as a number also migrates 13). A time zone must
-- be one PostgreSQL knows. The constraints are NOT VALID so that this migrates a database
-- holding such a row: new and changed rows are checked, and a bad row already present refuses
-- only its own jobs (with the reason) until `tally budgets set` replaces it.
CREATE FUNCTION tally_is_time_zone(name text) RETURNS boolean
LANGUAGE plpgsql IMMUTABLE AS $fn$
BEGIN
    PERFORM timestamptz '2000-01-01 00:00:00+00' AT TIME ZONE name;
    RETURN true;
EXCEPTION WHEN invalid_parameter_value THEN
    RETURN false;
END
$fn$;

ALTER TABLE budgets
    ADD CONSTRAINT budgets_limit_usd_bounded CHECK (limit_usd <= 1e9) NOT VALID,
    ADD CONSTRAINT budgets_default_reservation_usd_bounded
        CHECK (default_reservation_usd <= 1e9) NOT VALID,
    ADD CONSTRAINT budgets_time_zone_known CHECK (tally_is_time_zone(time_zone)) NOT VALID;

ALTER TABLE budget_reservations
    ADD CONSTRAINT budget_reservations_amount_usd_bounded CHECK (amount_usd <= 1e9) NOT VALID;

-- offered_limits: the limits the attempt was offered (its caps). lease_renewed_at: its last
-- sign of life (accept, re-attach, lease renewal); a lost attempt's run time ends there, not
-- when the reaper noticed. counted_until: set when the reaper ends an attempt without its
-- result (lost, or its offer timed out): until its result is recorded or this instant, its
-- budget reservations stand and it counts as its offered limits against its job's (its
-- daemon, cut off, may still be spending). NULL for every other attempt.
ALTER TABLE executions
    ADD COLUMN offered_limits jsonb,
    ADD COLUMN lease_renewed_at timestamptz,
    ADD COLUMN counted_until timestamptz;
