"""Test and benchmark fixtures: a fast static blob host and a fault-injecting proxy.

Standard library only, so they run wherever the SDK does::

    from pixcrawler.testing import Fault, FaultProxy, FaultSchedule, StaticServer
"""

from __future__ import annotations

from pixcrawler.testing.faults import (
    FAULT_KINDS,
    Fault,
    FaultKind,
    FaultProxy,
    FaultSchedule,
    ProxyStats,
)
from pixcrawler.testing.static import StaticServer, StaticStats

__all__ = [
    "FAULT_KINDS",
    "Fault",
    "FaultKind",
    "FaultProxy",
    "FaultSchedule",
    "ProxyStats",
    "StaticServer",
    "StaticStats",
]
