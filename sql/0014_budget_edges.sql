-- Budgets at their edges: the database refuses what no budget can enforce, and a lost
-- attempt keeps its reservation until its usage is known.
--
-- NaN and Infinity pass `>= 0` (in PostgreSQL's numeric order NaN sorts above every value,
-- Infinity included): `< 'Infinity'` refuses both. A time zone must be one PostgreSQL knows.
-- The constraints are NOT VALID so that this migrates a database holding such a row: new and
-- changed rows are checked, and a bad row already present refuses only its own jobs (with the
-- reason) until `tally budgets set` replaces it.
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
    ADD CONSTRAINT budgets_limit_usd_finite CHECK (limit_usd < 'Infinity') NOT VALID,
    ADD CONSTRAINT budgets_default_reservation_usd_finite
        CHECK (default_reservation_usd < 'Infinity') NOT VALID,
    ADD CONSTRAINT budgets_time_zone_known CHECK (tally_is_time_zone(time_zone)) NOT VALID;

ALTER TABLE budget_reservations
    ADD CONSTRAINT budget_reservations_amount_usd_finite CHECK (amount_usd < 'Infinity') NOT VALID;

-- Set when the reaper declares the attempt lost: its reservation still counts until its
-- result is recorded or until this instant (its daemon may never come back). NULL while the
-- attempt is live.
ALTER TABLE budget_reservations ADD COLUMN held_until timestamptz;
