"""VXLAN only from members, across Mininet hosts (labs/scenarios/security.py)."""


def test_vxlan_only_from_members(lab_run):
    report = lab_run("security", "--hosts", "2")
    assert {c["what"] for c in report["checks"]} >= {
        "VXLAN from a non-member dropped", "VXLAN from a member delivered"}
