"""The kernel helpers: netlink (pyroute2) and raw rtnetlink for the hot path, the nftables firewall."""
