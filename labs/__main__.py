"""`python -m labs SCENARIO`: build a Mininet lab of netd hosts, run the scenario through netd's
CLI on each host, print what was checked as tables, tear everything down, and exit non-zero if
any check failed. `python -m labs demo` runs every scenario in one lab."""

from __future__ import annotations

import argparse
import os
import sys
import time

from labs.lab import Lab, LabError
from labs.report import Report
from labs.scenarios import scenarios

DEMO = "demo"


def build_parser() -> argparse.ArgumentParser:
    known = scenarios()
    lines = "\n".join(f"  {name:<10} {s.summary}" for name, s in known.items())
    parser = argparse.ArgumentParser(
        prog="python -m labs",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Multi-host netd labs in Mininet (needs root).",
        epilog=f"scenarios:\n{lines}\n  {DEMO:<10} every driver's scenario, in one lab, ending in one table",
    )
    parser.add_argument("scenario", choices=[*known, DEMO], metavar="SCENARIO")
    parser.add_argument("--hosts", type=int, help="container hosts in the lab")
    parser.add_argument("--routed", action="store_true", help="two subnets joined by a router instead of one switch")
    parser.add_argument("--json", action="store_true", help="print the checks as JSON")
    parser.add_argument("--keep", action="store_true", help="leave the lab up and open Mininet's CLI (exit it to tear down)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if os.geteuid() != 0:
        print("labs need root (Mininet creates namespaces and links)", file=sys.stderr)
        return 2
    known = scenarios()
    chosen = [s for s in known.values() if s.in_demo] if args.scenario == DEMO else [known[args.scenario]]
    hosts = args.hosts or max(s.default_hosts for s in chosen)
    needs_store = any(s.cluster_store for s in chosen)
    daemon_args = tuple(arg for s in chosen for arg in s.daemon_args)
    report = Report()
    started = time.monotonic()
    try:
        with Lab(hosts=hosts, cluster_store=needs_store, routed=args.routed, daemon_args=daemon_args) as lab:
            for scenario in chosen:
                if not args.json:
                    print(f"== {scenario.name}: {scenario.summary}", flush=True)
                try:
                    scenario.run(lab, report, {"routed": args.routed})
                except LabError as e:
                    report.add(scenario.name, "scenario ran", "-", "-", False, str(e))
            if args.keep:
                keep(lab)
    except LabError as e:
        report.add(args.scenario, "lab started", "-", "-", False, str(e))
    except KeyboardInterrupt:
        print("interrupted: the lab was torn down", file=sys.stderr)
        return 130
    print_report(report, args.json, time.monotonic() - started)
    return 0 if report.ok else 1


def keep(lab: Lab) -> None:
    from mininet.cli import CLI

    print("The lab is up. Type e.g. `h1 netd ps` or `h2 netd network ls`; `exit` tears it down.")
    CLI(lab.net)


def print_report(report: Report, as_json: bool, seconds: float) -> None:
    if as_json:
        print(report.to_json())
        return
    print()
    for scenario in dict.fromkeys(c.scenario for c in report.checks):
        for what in dict.fromkeys(c.what for c in report.checks if c.scenario == scenario):
            if what.startswith("ping by"):
                print(report.matrix(scenario, what))
                print()
    print(report.summary())
    for failure in report.failures():
        print(f"FAIL {failure.scenario}: {failure.what} {failure.source} -> {failure.target}: {failure.detail}")
    print(f"\n{'all checks passed' if report.ok else 'SOME CHECKS FAILED'} ({seconds:.1f} s)")


if __name__ == "__main__":
    sys.exit(main())
