-- Job changes are announced once per statement, not once per row. Recording a batch of
-- results finishes up to thousands of jobs in one UPDATE; the per-row trigger ran plpgsql and
-- pg_notify for each, and every orchestrator's listener woke once per job.
--
-- A notification's payload is now one line per changed job, "<job id> <status> <cancel|->",
-- at most 100 lines (about 5 kB, below the 8,000-byte payload limit). The queue name left
-- the payload: no listener read it, and a name of any length could have pushed a payload past
-- the limit, failing the transaction that changed the job.
DROP TRIGGER jobs_notify ON jobs;
DROP FUNCTION tally_notify_job();

CREATE FUNCTION tally_notify_jobs() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    payload text;
BEGIN
    IF TG_OP = 'INSERT' THEN
        FOR payload IN
            SELECT string_agg(line, E'\n')
            FROM (SELECT n.id::text || ' ' || n.status || ' '
                         || CASE WHEN n.cancel_requested THEN 'cancel' ELSE '-' END AS line,
                         (row_number() OVER () - 1) / 100 AS chunk
                  FROM new_rows n) lines
            GROUP BY chunk
        LOOP
            PERFORM pg_notify('tally_jobs', payload);
        END LOOP;
    ELSE
        FOR payload IN
            SELECT string_agg(line, E'\n')
            FROM (SELECT n.id::text || ' ' || n.status || ' '
                         || CASE WHEN n.cancel_requested THEN 'cancel' ELSE '-' END AS line,
                         (row_number() OVER () - 1) / 100 AS chunk
                  FROM new_rows n JOIN old_rows o ON o.id = n.id
                  WHERE n.status IS DISTINCT FROM o.status
                     OR n.cancel_requested IS DISTINCT FROM o.cancel_requested) lines
            GROUP BY chunk
        LOOP
            PERFORM pg_notify('tally_jobs', payload);
        END LOOP;
    END IF;
    RETURN NULL;
END;
$$;

-- A trigger with transition tables has one event, hence two.
CREATE TRIGGER jobs_notify_insert AFTER INSERT ON jobs
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tally_notify_jobs();
CREATE TRIGGER jobs_notify_update AFTER UPDATE ON jobs
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION tally_notify_jobs();

-- No query filters per-model rows by model (reports group the usage_ledger view by it after
-- a time filter), and every recorded result inserted one entry per model into it.
DROP INDEX execution_model_usage_model_idx;
