"""What a lab checked, and the tables it prints at the end."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field


@dataclass
class Check:
    scenario: str
    what: str            # e.g. "ping by name", "published port", "route returns"
    source: str
    target: str
    ok: bool
    detail: str = ""


@dataclass
class Report:
    checks: list[Check] = field(default_factory=list)

    def add(self, scenario: str, what: str, source: str, target: str, ok: bool, detail: str = "") -> bool:
        self.checks.append(Check(scenario, what, source, target, ok, detail))
        return ok

    @property
    def ok(self) -> bool:
        return bool(self.checks) and all(c.ok for c in self.checks)

    def failures(self) -> list[Check]:
        return [c for c in self.checks if not c.ok]

    def to_json(self) -> str:
        return json.dumps({"ok": self.ok, "checks": [asdict(c) for c in self.checks]}, indent=2)

    def matrix(self, scenario: str, what: str) -> str:
        """A source x target table of one kind of check (ok / FAIL / -)."""
        checks = [c for c in self.checks if c.scenario == scenario and c.what == what]
        names = sorted({c.source for c in checks} | {c.target for c in checks})
        cell = {(c.source, c.target): "ok" if c.ok else "FAIL" for c in checks}
        rows = [[src] + [cell.get((src, dst), "-") for dst in names] for src in names]
        return render_table([f"{what}: from \\ to"] + names, rows)

    def summary(self) -> str:
        """One row per scenario and kind of check: how many passed."""
        groups: dict[tuple[str, str], list[Check]] = {}
        for c in self.checks:
            groups.setdefault((c.scenario, c.what), []).append(c)
        rows = []
        for (scenario, what), checks in groups.items():
            passed = sum(c.ok for c in checks)
            rows.append([scenario, what, f"{passed}/{len(checks)}", "ok" if passed == len(checks) else "FAIL"])
        return render_table(["SCENARIO", "CHECK", "PASSED", "RESULT"], rows)


def render_table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
             for row in [headers, *rows]]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def run_parallel(tasks, workers: int = 8) -> list:
    """Run zero-argument callables concurrently (checks are independent), keep their order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(lambda task: task(), tasks))
