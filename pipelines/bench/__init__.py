"""`mova bench`: benchmarks whose results go to docs/benchmarks.md."""
