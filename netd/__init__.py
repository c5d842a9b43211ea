"""netd: a container networking daemon (Docker's network model, across many hosts).

One layer per folder; imports only go down the list:

- `netd/api/`      the faces: the CLI, its client, the REST server and its views, the daemon entry point;
- `netd/debug/`    capture and trace: where things are, the sniffer worker, probes and diagnosis;
- `netd/core/`     the controller (networks, containers, ports, cluster events), IPAM, cluster, DNS;
- `drivers/`       one folder per network driver, behind `netd.contract.driverapi`;
- `netd/kernel/`   netlink, rtnl and nftables helpers;
- `netd/contract/` the leaf: the driver interface, the model, the errors, the version.

`kvstore/` (the cluster stores) and `runtime/` (namespaces, processes) import nothing of netd.
"""
