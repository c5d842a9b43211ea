"""dockerd on two Mininet hosts, netd as its plugin on each: one overlay (labs/scenarios/docker.py)."""


def test_dockerd_containers_reach_each_other_across_hosts(lab_run):
    report = lab_run("docker", "--hosts", "2")
    assert {c["what"] for c in report["checks"]} >= {
        "one netd overlay for both dockerds", "dockerd containers ping across hosts",
        "netd's IPAM knows the other host's docker container"}
