"""How the CLI prints: aligned tables (as docker's) and JSON."""

from __future__ import annotations

import json


def print_table(headers: list[str], rows: list[list[str]]) -> None:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(str(c))) for w, c in zip(widths, row, strict=True)]
    for row in [headers, *rows]:
        print("   ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def print_json(obj) -> None:
    print(json.dumps(obj, indent=4))
