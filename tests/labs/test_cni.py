"""netd as a CNI plugin on two Mininet hosts: one overlay (labs/scenarios/cni.py)."""


def test_cni_namespaces_reach_each_other_across_hosts(lab_run):
    report = lab_run("cni", "--hosts", "2")
    assert {c["what"] for c in report["checks"]} >= {
        "ADD through the netd plugin", "addresses unique across hosts", "CNI namespaces ping across hosts",
        "netd ipam lookup names both", "DEL (twice)"}
