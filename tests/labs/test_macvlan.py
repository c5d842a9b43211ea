"""The macvlan driver across Mininet hosts (labs/scenarios/macvlan.py): Docker's static --ip way,
then one cluster-wide pool with host access."""


def checks(report: dict, what: str) -> list[dict]:
    return [c for c in report["checks"] if c["what"] == what]


def test_macvlan_on_three_hosts(lab_run):
    report = lab_run("macvlan", "--hosts", "3")
    assert len(checks(report, "ping by address (static --ip)")) == 6
    assert len(checks(report, "ping by name (cluster IPAM)")) == 30
    assert len(checks(report, "warns of another host's local subnet")) == 2
    [unique] = checks(report, "addresses unique across hosts (cluster IPAM)")
    assert unique["ok"] and len(unique["detail"].split()) == 6
    assert len(checks(report, "host reaches its own container (host_access)")) == 6
