"""netd capture and netd trace across two Mininet hosts (labs/scenarios/debug.py): an overlay with
a pcap, the underlay's VNI, traces that work and an FDB entry deleted on each side; then hostgw
(with a blackhole route) and global macvlan traces."""


def checks(report: dict, what: str) -> list[dict]:
    return [c for c in report["checks"] if c["what"] == what]


def test_capture_and_trace_find_what_is_broken(lab_run):
    report = lab_run("debug", "--hosts", "2")
    for what in ("capture pcap: echo and reply", "capture -c 4 during 3 pings: no chatter",
                 "underlay VNI matches", "trace: every hop both ways",
                 "trace names the broken hop", "trace names the broken hop (answer)",
                 "trace hostgw: every hop both ways", "trace hostgw finds a blackhole route",
                 "trace macvlan: every hop both ways"):
        assert checks(report, what), f"no check {what!r} ran"
