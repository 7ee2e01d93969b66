"""Benchmarks of the chat service (not tests): `python -m bench` prints tables and saves JSON.

Each benchmark is a module with ``NAME`` and ``run(env, quick) -> dict`` (a JSON-able result with a
``tables`` list, printed by bench.common.print_tables). `env` is a bench.env.BenchEnv: the protocol
fakes (each in its own process) and a scratch directory, shared by the benchmarks of one run.
"""
