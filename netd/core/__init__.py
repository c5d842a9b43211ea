"""The core: the controller (split by concern), IPAM, cluster membership, DNS, the store key layout."""
