"""Exceptions: one class per failure kind, all under GateError."""
from __future__ import annotations


class GateError(RuntimeError):
    """Base class of every esper_gate failure."""


class GateDivergenceError(GateError):
    """Ranks are not at the same call or do not hold the same slot state.

    ``report`` is the DivergenceReport that says who holds what.
    """

    def __init__(self, message: str, report=None):
        super().__init__(message)
        self.report = report


class GateTimeoutError(GateError):
    """A rank never arrived at a sync (it skipped the call, hung or died).

    ``missing_ranks``: the ranks that did not arrive. ``last_completed``: for
    every rank, the last call number it completed (-1: none, None: unknown).
    """

    def __init__(self, message: str, missing_ranks=(), last_completed=None, call=None):
        super().__init__(message)
        self.missing_ranks = list(missing_ranks)
        self.last_completed = dict(last_completed or {})
        self.call = call


class GateInputError(GateError, ValueError):
    """This rank passed bad input. The other ranks got a GatePeerInputError."""


class GatePeerInputError(GateError):
    """Another rank passed bad input; ``ranks`` names them, ``reasons`` says what."""

    def __init__(self, message: str, ranks=(), reasons=None, report=None):
        super().__init__(message)
        self.ranks = list(ranks)
        self.reasons = dict(reasons or {})
        self.report = report


class GateConfigError(GateError):
    """GateSync was built with different settings on different ranks."""

    def __init__(self, message: str, configs=None):
        super().__init__(message)
        self.configs = dict(configs or {})
