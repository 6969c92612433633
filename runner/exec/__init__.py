"""Running steps: the scheduler, its backends, and the multi-process train launcher."""
