"""Lab scenarios. Each is a function `run(lab, report, options)` that drives netd through its
CLI on the lab hosts and records checks in the report; SCENARIOS maps names to them, with
what lab each needs."""

from __future__ import annotations

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


def scenarios() -> dict[str, Scenario]:
    from labs.scenarios import bridge

    found = [bridge.SCENARIO]
    return {s.name: s for s in found}
