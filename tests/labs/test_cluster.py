"""Cluster-wide IPAM and the failures a cluster lives through, across Mininet hosts."""


def test_cluster_ipam_across_three_hosts(lab_run):
    report = lab_run("ipam", "--hosts", "3")
    assert {c["what"] for c in report["checks"]} >= {
        "no address twice", "same static address at once", "dead host's addresses reclaimed", "lookup from another host"}


def test_store_outage_link_cut_corrupt_value_and_missing_store(lab_run):
    report = lab_run("failures", "--hosts", "3")
    assert len(report["checks"]) == 8


def test_live_host_cut_off_past_reclaim_then_healed(lab_run):
    """The fault lab: no address twice among running containers after a partition and a reclaim;
    a daemon killed mid-run converges."""
    report = lab_run("faults", "--hosts", "3")
    assert {c["what"] for c in report["checks"]} >= {
        "cut-off host reclaimed", "no address twice after the heal", "returning containers reach the others",
        "kill -9 during run: converges"}
