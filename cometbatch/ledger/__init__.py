"""The results ledger: its writer, its one reader, the per-key index and the lock."""
