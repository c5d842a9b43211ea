"""Network drivers, one package each, and the registry the controller picks them from."""

from __future__ import annotations

from netd.driverapi import Driver, DriverContext
from netd.errors import BadRequest


def driver_classes() -> dict[str, type[Driver]]:
    from drivers.bridge import BridgeDriver
    from drivers.host import HostDriver
    from drivers.null import NullDriver

    return {cls.name: cls for cls in (BridgeDriver, HostDriver, NullDriver)}


def load_drivers(ctx: DriverContext) -> dict[str, Driver]:
    return {name: cls(ctx) for name, cls in driver_classes().items()}


def unknown_driver(name: str, known: dict[str, Driver]) -> BadRequest:
    return BadRequest(f"unknown driver {name!r} (available: {', '.join(sorted(known))})")
