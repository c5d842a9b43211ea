"""Debugging a container network: `netd capture` (capture, sniffer, worker), `netd trace` (trace/), what is where (points), probes and dissection (packets)."""
