"""esper_gate: one fused, hang-proof cross-rank gate consensus for Esper's seed slots.

``torch.ops.esper_gate.sync`` packs every slot's gate vote and stage into one
small tensor, does one all_reduce that checks symmetry and computes the
consensus, and decodes on the device. ``GateSync`` is the object to hold.
"""
from __future__ import annotations

from . import build_info as _build_info_mod

BUILD_INFO, _BUILD_PROBLEM = _build_info_mod.preflight()
if _BUILD_PROBLEM is not None and not _build_info_mod.info_command_is_running():
    raise _BUILD_PROBLEM

if _BUILD_PROBLEM is None:  # else only `python -m esper_gate info` runs, and it reports the problem
    import torch  # noqa: F401

    from . import _C  # noqa: F401  (registers torch.ops.esper_gate)
    from . import ops, wire
    from .ops import decode, pack, sync
    from .errors import (GateConfigError, GateDivergenceError, GateError, GateInputError,
                         GatePeerInputError, GateTimeoutError)
    from .report import DivergenceReport, parse_report
    from .gate_sync import GateConsensus, GateSync, site_fingerprint
    from ._inputs import state_digest
    from .wire import NO_GATE

__version__ = (BUILD_INFO or {}).get("version", "0.1.0")

__all__ = [
    "BUILD_INFO", "ops", "wire", "pack", "decode", "sync", "__version__",
    "GateSync", "GateConsensus", "DivergenceReport", "parse_report", "site_fingerprint", "state_digest", "NO_GATE",
    "GateError", "GateDivergenceError", "GateTimeoutError", "GateInputError", "GatePeerInputError",
    "GateConfigError",
]
