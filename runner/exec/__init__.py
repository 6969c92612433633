"""Running a build: the scheduler (what runs when, the lockfile, the run-cache, the display) and the
backends that run one step from a plain job description (inline, process, ray)."""
