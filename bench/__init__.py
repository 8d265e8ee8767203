"""Performance benchmark of the receipts worker: ``python -m bench [--quick] [--json]``."""
