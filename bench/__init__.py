"""bench: the cdbench harness (tasks, method registry, sweeps, plots)."""
