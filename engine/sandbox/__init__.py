"""Throw-away surroundings for the engine: a PostgreSQL server (`postgres`) and a cluster of
engine processes on one store (`cluster`), for the tests, the crash harnesses and the
benchmarks. The engine itself never imports this package (a contract in pyproject.toml)."""
