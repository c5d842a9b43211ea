"""The overlay driver across Mininet hosts: Docker's docs scenario, restart, dead host, routed."""


def checks(report: dict, what: str) -> list[dict]:
    return [c for c in report["checks"] if c["what"] == what]


def test_overlay_on_three_hosts(lab_run):
    report = lab_run("overlay", "--hosts", "3")
    assert len(checks(report, "ping by name")) == 6
    assert checks(report, "dead host unprogrammed") and checks(report, "restart keeps the data plane")


def test_overlay_across_a_router(lab_run):
    report = lab_run("overlay", "--hosts", "2", "--routed")
    assert len(checks(report, "ping by address")) == 2
