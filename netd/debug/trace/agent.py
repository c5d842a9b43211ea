"""The remote side of a trace, through the cluster store: requests to other hosts, and serving theirs."""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import threading
import time

from netd.contract.errors import BadRequest, NetdError
from netd.debug.packets import Probe
from netd.debug.trace.local import HostPart
from netd.debug.trace.plan import (
    HOP_KINDS,
    KEY_TTL,
    MAX_CONCURRENT,
    MAX_SECONDS,
    READY_TIMEOUT,
    REQUESTS,
    RESULTS,
    STOPS,
    Plan,
)

log = logging.getLogger(__name__)


class RemoteRequests:
    """The requester's side of the rendezvous in the cluster store (see the module docstring)."""

    def __init__(self, ctl, trace_id: str, plan: Plan, probe: Probe, remote: dict, macs: list[str],
                 timeout: float):
        self.ctl = ctl
        self.store = ctl.cluster_store
        self.id = trace_id
        self.plan = plan
        self.probe = probe
        self.remote = remote
        self.macs = macs
        self.timeout = timeout
        self.lease = None
        self.waiting: set[str] = set()
        self.failed: dict[str, str] = {}

    def post(self) -> None:
        self.lease = self.store.grant_lease(KEY_TTL)
        for host, hops in self.remote.items():
            if not self.ctl.cluster.alive(host):
                self.failed[host] = f"host {host} is not alive in the cluster (its daemon stopped renewing its lease)"
                continue
            request = {"Id": self.id, "From": self.ctl.host_key, "Network": self.plan.network.id,
                       "Hops": [{"Index": i, "Kind": h.kind, "Endpoint": h.endpoint} for i, h in hops],
                       "Probe": self.probe.to_json(), "MACs": self.macs,
                       "Seconds": min(MAX_SECONDS, self.timeout + READY_TIMEOUT + 5), "Created": time.time()}
            self.store.put(f"{REQUESTS}{host}/{self.id}", json.dumps(request), self.lease)
            self.waiting.add(host)

    def _result(self, host: str) -> dict | None:
        pair = self.store.get(f"{RESULTS}{self.id}/{host}")
        return json.loads(pair.value) if pair is not None else None

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        pending = set(self.waiting)
        while pending and time.monotonic() < deadline:
            for host in list(pending):
                result = self._result(host)
                if result is not None:
                    pending.discard(host)
                    if result.get("Error"):
                        self.failed[host] = result["Error"]
                        self.waiting.discard(host)
            if pending:
                time.sleep(0.05)
        for host in pending:
            self.failed[host] = (f"host {host} did not answer the trace request within {timeout:.0f} s "
                                 "(is its netd daemon running, and as new as this one?)")
            self.waiting.discard(host)

    def finish(self) -> dict[str, dict]:
        results: dict[str, dict] = {host: {"Error": error} for host, error in self.failed.items()}
        try:
            self.store.put(f"{STOPS}{self.id}", "stop", self.lease)
            deadline = time.monotonic() + 10
            pending = set(self.waiting)
            while pending and time.monotonic() < deadline:
                for host in list(pending):
                    result = self._result(host)
                    if result is not None and result.get("Done"):
                        results[host] = result
                        pending.discard(host)
                if pending:
                    time.sleep(0.05)
            for host in pending:
                results[host] = {"Error": f"host {host} did not report what it saw"}
        finally:
            for host in self.remote:
                with contextlib.suppress(NetdError):
                    self.store.delete(f"{REQUESTS}{host}/{self.id}")
            with contextlib.suppress(NetdError):
                self.store.delete_prefix(f"{RESULTS}{self.id}/")
                self.store.delete(f"{STOPS}{self.id}")
            with contextlib.suppress(Exception):
                self.lease.revoke()
        return results


class TraceAgent:
    """Serves other hosts' trace requests for this host (see the module docstring)."""

    def __init__(self, ctl):
        self.ctl = ctl
        self.store = ctl.cluster_store
        self.prefix = f"{REQUESTS}{ctl.host_key}/"
        self.mirror = None
        self._active: set[str] = set()
        self._lock = threading.Lock()

    def start(self) -> TraceAgent:
        from kvstore.mirror import Mirror

        self.mirror = Mirror(self.store, self.prefix, on_put=self._on_request).start()
        return self

    def stop(self) -> None:
        if self.mirror is not None:
            self.mirror.stop()

    def _on_request(self, pair) -> None:
        trace_id = pair.key[len(self.prefix):]
        try:
            request = json.loads(pair.value)
            if not isinstance(request, dict) or request.get("Id") != trace_id:
                raise ValueError("malformed")
            if time.time() - float(request.get("Created", 0)) > KEY_TTL:
                return   # an old request that outlived its requester
        except (ValueError, TypeError):
            log.warning("ignoring a malformed trace request at %s", pair.key)
            return
        with self._lock:
            if trace_id in self._active:
                return
            if len(self._active) >= MAX_CONCURRENT:
                self._answer(trace_id, {"Done": True, "Error": f"host {self.ctl.host_key} is busy with "
                                        f"{MAX_CONCURRENT} traces already"})
                return
            self._active.add(trace_id)
        threading.Thread(target=self._serve, args=(trace_id, request), name=f"trace {trace_id}", daemon=True).start()

    def _answer(self, trace_id: str, result: dict, lease=None) -> None:
        with contextlib.suppress(NetdError):
            self.store.put(f"{RESULTS}{trace_id}/{self.ctl.host_key}", json.dumps(result), lease)

    def _serve(self, trace_id: str, request: dict) -> None:
        part = None
        lease = None
        try:
            lease = self.store.grant_lease(KEY_TTL)
            network, hops, probe, macs, seconds = self._validate(request)
            endpoints = {h.endpoint: self.ctl.local_endpoint(h.endpoint) for _, h in hops if h.endpoint}
            part = HostPart(self.ctl, network, hops, probe, endpoints, seconds=seconds + 5).start()
            part.wait_ready(READY_TIMEOUT)
            self._answer(trace_id, {"Ready": True}, lease)
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline and self.store.get(f"{STOPS}{trace_id}") is None:
                time.sleep(0.05)
            time.sleep(0.05)
            part.stop()
            report = part.report(macs, [probe.dst, probe.src])
            self._answer(trace_id, {"Done": True, "Hops": {str(i): h for i, h in report.items()}}, lease)
        except NetdError as e:
            self._answer(trace_id, {"Done": True, "Error": f"on host {self.ctl.host_key}: {e.message}"}, lease)
        except Exception as e:  # noqa: BLE001 - the requester must hear something
            log.exception("trace %s failed", trace_id)
            self._answer(trace_id, {"Done": True, "Error": f"on host {self.ctl.host_key}: internal error: {e}"}, lease)
        finally:
            if part is not None:
                part.stop()
            with self._lock:
                self._active.discard(trace_id)

    def _validate(self, request: dict):
        """Only what this host can check itself: its networks, its endpoints, sane probe fields."""
        from netd.contract.driverapi import Hop

        network = self.ctl.network_by_id(str(request.get("Network")))
        if network is None or network.scope != "global":
            raise BadRequest("the trace names a network this host does not know")
        hops = []
        for item in request.get("Hops") or []:
            kind, endpoint = str(item.get("Kind")), str(item.get("Endpoint") or "")
            if kind not in HOP_KINDS:
                raise BadRequest(f"unknown hop kind {kind!r}")
            if endpoint:
                known = self.ctl.local_endpoint(endpoint)
                if known is None or known.network_id != network.id:
                    raise BadRequest(f"endpoint {endpoint[:12]} of network {network.name} is not on this host")
            hops.append((int(item["Index"]), Hop(self.ctl.host_key, kind, endpoint)))
        probe = Probe.from_json(request.get("Probe") or {})
        if probe.proto not in ("icmp", "tcp", "udp"):
            raise BadRequest(f"unknown probe protocol {probe.proto!r}")
        for address in (probe.src, probe.dst):
            ipaddress.IPv4Address(address)
        int(probe.token or "0", 16)
        if len(probe.token) > 64:
            raise BadRequest("probe token too long")
        macs = [str(m) for m in request.get("MACs") or []][:4]
        seconds = min(MAX_SECONDS, max(1.0, float(request.get("Seconds") or 10)))
        return network, hops, probe, macs, seconds
