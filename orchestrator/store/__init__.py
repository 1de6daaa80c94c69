"""All SQL of the orchestrator lives in this package; callers get typed rows, never statements."""

from orchestrator.store.jobs import ClaimedJob, JobStore, JobView
from orchestrator.store.ledger import BatchOutcome, LedgerStore

__all__ = ["BatchOutcome", "ClaimedJob", "JobStore", "JobView", "LedgerStore"]
