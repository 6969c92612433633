"""Running a build: the scheduler (what runs when, the display), each step's way through the build
(step_lifecycle: the run-cache, the lockfile), and the backends that run one step from a plain job
description (inline, process, ray)."""
