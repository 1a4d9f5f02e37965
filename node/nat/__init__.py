"""Reaching nodes behind NAT: circuit relay v2 (relay.py), hole punching (punch.py); README.md says
what works and what does not."""

from .punch import HolePuncher
from .relay import (
    CircuitDialer,
    RelayReservation,
    RelayServiceConfig,
    ReservationRefused,
    StopGuard,
    circuit_protocol,
    forget_failed_dial,
    is_circuit,
)

__all__ = ["CircuitDialer", "HolePuncher", "RelayReservation", "RelayServiceConfig", "ReservationRefused", "StopGuard",
           "circuit_protocol", "forget_failed_dial", "is_circuit"]
