"""Network drivers, one package each, and the registry the controller picks them from.

A driver package exports `DRIVER`, its Driver class; the registry finds every package here
that does, so adding a driver is adding its folder.
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from collections.abc import Callable

from netd.contract.driverapi import Driver, DriverContext
from netd.contract.errors import BadRequest

log = logging.getLogger("netd.drivers")


def driver_classes() -> dict[str, type[Driver]]:
    found = {}
    for module in pkgutil.iter_modules(__path__):
        if not module.ispkg:
            continue
        try:
            cls = getattr(importlib.import_module(f"{__name__}.{module.name}"), "DRIVER", None)
        except ImportError as e:   # one broken driver must not take the others down
            log.error("driver package %s could not be loaded: %s", module.name, e)
            continue
        if cls is not None:
            found[cls.name] = cls
    return found


def load_drivers(context_for: Callable[[str], DriverContext]) -> dict[str, Driver]:
    """Every driver, each with its own context (`context_for(name)`: its folders of the stores)."""
    return {name: cls(context_for(name)) for name, cls in driver_classes().items()}


def unknown_driver(name: str, known: dict[str, Driver]) -> BadRequest:
    return BadRequest(f"unknown driver {name!r} (available: {', '.join(sorted(known))})")
