-- Which token a connected daemon presented, as a SHA-256 fingerprint (never the token).
-- A registration under a daemon id that a live connection of another token holds is refused,
-- so one daemon token cannot take over another daemon's id and its executions, on this
-- orchestrator or on another one sharing the database. NULL: insecure mode, no token.
ALTER TABLE daemons ADD COLUMN token_fingerprint text;
