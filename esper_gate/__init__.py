"""esper_gate: one fused, hang-proof cross-rank gate consensus for Esper's seed slots.

``torch.ops.esper_gate.sync`` packs every slot's gate vote and stage into one
small tensor, does one all_reduce that checks symmetry and computes the
consensus, and decodes on the device. ``GateSync`` is the object to hold.
"""
from __future__ import annotations

from . import build_info as _build_info_mod

BUILD_INFO = _build_info_mod.load()
_build_info_mod.check(BUILD_INFO)

import torch  # noqa: E402

from . import _C  # noqa: E402,F401  (registers torch.ops.esper_gate)
from . import ops, wire  # noqa: E402
from .ops import decode, pack, sync  # noqa: E402
from .errors import (GateConfigError, GateDivergenceError, GateError, GateInputError,  # noqa: E402
                     GatePeerInputError, GateTimeoutError)
from .report import DivergenceReport, parse_report  # noqa: E402
from .gate_sync import GateConsensus, GateSync, site_fingerprint  # noqa: E402

__version__ = BUILD_INFO.get("version", "0.0.0")

__all__ = [
    "BUILD_INFO", "ops", "wire", "pack", "decode", "sync", "__version__",
    "GateSync", "GateConsensus", "DivergenceReport", "parse_report", "site_fingerprint",
    "GateError", "GateDivergenceError", "GateTimeoutError", "GateInputError", "GatePeerInputError",
    "GateConfigError",
]
