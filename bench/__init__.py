"""Zeus benchmarks: `python -m bench engine` (in process) and `python -m bench serve` (over HTTP)."""
