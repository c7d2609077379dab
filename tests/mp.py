"""Spawn real ranks for a test (see esper_gate._spawn): a hang fails one test."""
from __future__ import annotations

from esper_gate._spawn import RankResult, spawn_ranks, values  # noqa: F401


def run_ranks(fn, world: int, *args, timeout: float = 60.0, backend: str = "gloo",
              pg_timeout_s: float = 30.0, expect_dead: tuple[int, ...] = ()) -> list[RankResult]:
    return spawn_ranks(fn, world, *args, backend=backend, timeout=timeout, pg_timeout_s=pg_timeout_s,
                       expect_dead=expect_dead)
