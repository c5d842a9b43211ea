"""netd capture and netd trace across two Mininet hosts on an overlay (labs/scenarios/debug.py)."""


def checks(report: dict, what: str) -> list[dict]:
    return [c for c in report["checks"] if c["what"] == what]


def test_capture_and_trace_find_a_broken_fdb_entry(lab_run):
    report = lab_run("debug", "--hosts", "2")
    assert checks(report, "capture pcap: echo and reply") and checks(report, "underlay VNI matches")
    assert checks(report, "trace: every hop both ways")
    assert checks(report, "trace names the broken hop") and checks(report, "trace names the broken hop (answer)")
