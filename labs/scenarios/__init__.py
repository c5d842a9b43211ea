"""Lab scenarios. Each is a function `run(lab, report, options)` that drives netd through its
CLI on the lab hosts and records checks in the report. Each module defines SCENARIO (a Scenario:
its function and what lab it needs); `scenarios()` finds them, in the demo's order."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass

from labs.lab import Lab
from labs.report import Report


@dataclass(frozen=True)
class Scenario:
    name: str
    summary: str
    run: Callable[[Lab, Report, dict], None]
    default_hosts: int = 3
    cluster_store: bool = True
    daemon_args: tuple[str, ...] = ()      # e.g. a short --host-ttl for scenarios where hosts die
    in_demo: bool = True                   # `python -m labs demo` runs it


ORDER = ["bridge", "overlay", "macvlan", "hostgw", "debug", "failures"]


def scenarios() -> dict[str, Scenario]:
    """Every module here that defines SCENARIO, in the order the demo runs them."""
    found = {}
    for module in pkgutil.iter_modules(__path__):
        scenario = getattr(importlib.import_module(f"{__name__}.{module.name}"), "SCENARIO", None)
        if scenario is not None:
            found[scenario.name] = scenario
    rank = {name: i for i, name in enumerate(ORDER)}
    return dict(sorted(found.items(), key=lambda item: rank.get(item[0], len(rank))))
