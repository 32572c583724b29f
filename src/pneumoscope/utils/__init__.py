"""Small helpers used across the package (atomic file writes, locks, hashing, logging)."""
