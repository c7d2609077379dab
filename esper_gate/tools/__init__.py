"""Tools built on the library, not part of its API: the demo and the benchmark.

``python -m esper_gate demo`` and ``python -m esper_gate bench`` run them.
"""
