"""The hostgw driver across Mininet hosts (labs/scenarios/hostgw.py): a part per host, routes that
come back after being deleted or flushed, a dead host's routes that leave; and hosts behind a
router, reported instead of silently unrouted."""


def checks(report: dict, what: str) -> list[dict]:
    return [c for c in report["checks"] if c["what"] == what]


def test_hostgw_on_three_hosts(lab_run):
    report = lab_run("hostgw", "--hosts", "3")
    assert len(checks(report, "ping by name")) == 6
    assert checks(report, "route deleted by hand returns") and checks(report, "routes return after eth0 restart")
    assert len(checks(report, "dead host's route leaves")) == 2
    assert checks(report, "restarted host takes its part back")


def test_hostgw_across_a_router_says_why_peers_are_not_routed(lab_run):
    report = lab_run("hostgw", "--hosts", "3", "--routed")
    assert len(checks(report, "peer behind a router reported")) == 4
    assert len(checks(report, "adjacent peer routed")) == 2 and len(checks(report, "the log says why")) == 3
