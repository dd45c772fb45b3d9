"""Studies built from many runs: the sweep runner and per-study reports."""
