"""Small statistics and table helpers shared by every benchmark in `bench/`.

    >>> summarize([0.010, 0.012, 0.011])
    {'median_ms': 11.0, 'p99_ms': 12.0, 'n': 3}
    >>> print_table([["docker", "39.1"], ["cni", "23.0"]], ["PEER", "ATTACH ms"])
    PEER    ATTACH ms
    ------  ---------
    docker       39.1
    cni          23.0
"""

from __future__ import annotations

import math
import statistics
import sys
from collections.abc import Sequence
from typing import TextIO


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0 < q <= 100) by the nearest-rank method: always a measured sample,
    never an interpolation, so p99 of fewer than 100 samples is simply the largest one."""
    if not samples:
        return math.nan
    if not 0 < q <= 100:
        raise ValueError(f"percentile must be in (0, 100], not {q}")
    ordered = sorted(samples)
    rank = math.ceil(q / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


def summarize(samples_seconds: Sequence[float]) -> dict[str, float | int]:
    """Median and p99 (nearest rank) in milliseconds, and the number of samples.

    An empty list gives NaN figures and n=0 rather than an exception, so a table can still be
    printed for a peer that produced nothing at some level."""
    n = len(samples_seconds)
    if n == 0:
        return {"median_ms": math.nan, "p99_ms": math.nan, "n": 0}
    return {
        "median_ms": statistics.median(samples_seconds) * 1000.0,
        "p99_ms": percentile(samples_seconds, 99) * 1000.0,
        "n": n,
    }


def _is_number(cell: str) -> bool:
    text = cell.strip().rstrip("x%").replace(",", "")
    try:
        float(text)
    except ValueError:
        return False
    return True


def format_table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """Aligned plain text: headers, a dash rule, then rows. Numeric cells (also "3.2x", "45%")
    are right-aligned, everything else left-aligned. Cells are converted with str()."""
    width = len(headers)
    text_rows = [[str(cell) for cell in row] for row in rows]
    for row in text_rows:
        if len(row) != width:
            raise ValueError(f"row has {len(row)} cells, headers have {width}: {row}")
    widths = [max([len(h)] + [len(row[c]) for row in text_rows]) for c, h in enumerate(headers)]
    numeric = [bool(text_rows) and all(_is_number(row[c]) for row in text_rows if row[c].strip())
               for c in range(width)]

    def line(cells: Sequence[str], align: bool) -> str:
        out = []
        for c, cell in enumerate(cells):
            out.append(cell.rjust(widths[c]) if align and numeric[c] else cell.ljust(widths[c]))
        return "  ".join(out).rstrip()

    lines = [line(list(headers), align=True), "  ".join("-" * w for w in widths)]
    lines += [line(row, align=True) for row in text_rows]
    return "\n".join(lines)


def print_table(rows: Sequence[Sequence[object]], headers: Sequence[str], file: TextIO | None = None) -> None:
    """Print format_table(rows, headers) to file (default stdout)."""
    print(format_table(rows, headers), file=file if file is not None else sys.stdout, flush=True)
