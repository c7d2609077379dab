"""Esper's vocabulary: its seed stage and gate ids, and the names reports print.

The values are Esper's ``SeedStage`` and ``GateLevel`` IntEnum values, stable
across Esper releases (stage 5 and gate 4 are intentionally unused). This is
the one place esper_gate spells them: the generic layer (wire format, ops,
GateSync, reports) knows ids only and takes names from its caller; the Esper
adapters (``kasmina``, the demo) pass ``VOCABULARY``.
"""
from __future__ import annotations

from enum import IntEnum

from .report import Vocabulary

__all__ = ["SeedStage", "GateLevel", "STAGE_NAMES", "GATE_NAMES", "VOCABULARY"]


class SeedStage(IntEnum):
    UNKNOWN = 0
    DORMANT = 1      # an empty slot
    GERMINATED = 2
    TRAINING = 3
    BLENDING = 4
    HOLDING = 6
    FOSSILIZED = 7   # terminal success
    PRUNED = 8
    EMBARGOED = 9
    RESETTING = 10


class GateLevel(IntEnum):
    G0 = 0   # to GERMINATED
    G1 = 1   # to TRAINING
    G2 = 2   # to BLENDING
    G3 = 3   # to HOLDING
    G5 = 5   # to FOSSILIZED


STAGE_NAMES: dict[int, str] = {int(s): s.name for s in SeedStage}
GATE_NAMES: dict[int, str] = {int(g): g.name for g in GateLevel}

# What Esper's reports print: "rank 2 holds BLENDING -> G3".
VOCABULARY = Vocabulary(stages=STAGE_NAMES, targets=GATE_NAMES)
