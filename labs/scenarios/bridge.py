"""Single-host bridge networking, as in Docker's docs: a user-defined bridge, two containers that
reach each other by name, the outside reached through NAT, a published port reached from
another machine."""

from __future__ import annotations

from labs.lab import Lab
from labs.report import Report
from labs.scenarios import Scenario
from labs.scenarios.common import check_all_pairs, container_address, pings, unique

WEB_PORT = 8080


def run(lab: Lab, report: Report, options: dict) -> None:
    host = lab.container_hosts[0]
    net, web, app = unique("web"), unique("web"), unique("app")
    lab.netd(host, "network", "create", "--subnet", "172.20.0.0/16", net)
    try:
        lab.netd(host, "run", "-d", "--name", web, "--network", net, "-p", f"{WEB_PORT}:80",
                 "busybox", "httpd", "-f", "-p", "80", "-h", "/etc")
        lab.netd(host, "run", "-d", "--name", app, "--network", net, "sleep", "1000")
        containers = {name: (host, container_address(lab, host, name, net)) for name in (web, app)}
        check_all_pairs(lab, report, "bridge", containers)
        ok, detail = pings(lab, host, app, lab.ext_address)
        report.add("bridge", "outbound NAT", app, "ext", ok, detail)
        url = f"http://{lab.addresses[host]}:{WEB_PORT}/hostname"
        served = lab.sh("ext", f"curl -s --max-time 5 {url}")
        report.add("bridge", "published port", "ext", web, served.returncode == 0 and bool(served.stdout.strip()),
                   f"GET {url}: {served.stdout.strip() or served.stderr.strip()}")
    finally:
        lab.try_netd(host, "rm", "-f", web, app)
        lab.try_netd(host, "network", "rm", net)


SCENARIO = Scenario("bridge", "single host: user-defined bridge, names, NAT, published port", run,
                    default_hosts=1, cluster_store=False)
