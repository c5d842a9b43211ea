"""Containers: run (sandbox, /etc files, process), exit, stop, remove, and finding them."""


import logging
import os
import shutil
import threading

from netd.contract.driverapi import Driver
from netd.contract.errors import BadRequest, Conflict, NotFound
from netd.contract.model import (
    Container,
    Endpoint,
    Network,
    PortBinding,
    check_name,
    new_id,
    now,
)
from netd.core.keys import (
    CONTAINER_NAMES,
    CONTAINERS,
)
from netd.core.names import random_name
from netd.core.state import DEFAULT_BRIDGE_NETWORK, STOP_TIMEOUT
from netd.core.undo import Undo
from netd.kernel import netlink
from netd.kernel.rtnl import flush_retired
from runtime import capabilities, etcfiles, namespaces, process
from runtime.errors import RuntimeFailure

log = logging.getLogger(__name__)



class Containers:
    """The Controller's containers: run, exit, stop, remove, and finding them."""

    # --- containers: run --------------------------------------------------------------------

    def run(
        self,
        cmd: list[str],
        name: str | None = None,
        hostname: str | None = None,
        network: str = DEFAULT_BRIDGE_NETWORK,
        ip: str | None = None,
        aliases: list[str] | None = None,
        ports: list[PortBinding] | None = None,
        publish_all: bool = False,
        expose: list[str] | None = None,
        rootfs: str | None = None,
        env: dict[str, str] | None = None,
        detach: bool = False,
        auto_remove: bool = False,
        hold_removal: bool = False,
        cap_add: list[str] | None = None,
        cap_drop: list[str] | None = None,
        privileged: bool = False,
    ) -> Container:
        """Create and start a container. `hold_removal` keeps an --rm container's record
        after it exits until release_removal(), so a foreground client gets all its output."""
        if not cmd:
            raise BadRequest("no command given: netd run [OPTIONS] [--] CMD [ARG...]")
        if rootfs is not None and not os.path.isdir(rootfs):
            raise BadRequest(f"--rootfs {rootfs}: no such directory")
        try:
            kept = None if privileged else capabilities.effective(cap_add or [], cap_drop or [])
        except capabilities.UnknownCapability as e:
            raise BadRequest(str(e)) from None
        ports = list(ports or [])
        with self.lock:
            if name is None:
                name = self._unused_name()
            check_name("container", name)
            if self._find_container(name, exact_name=True) is not None:
                raise Conflict(f"container name {name} is already in use: remove it or choose another --name")
            container_id = new_id()
            container = Container(
                id=container_id, name=name, cmd=list(cmd), hostname=hostname or container_id[:12],
                network_mode=network, rootfs=rootfs, env=dict(env or {}), detach=detach,
                auto_remove=auto_remove, ports=ports, publish_all=publish_all, exposed=list(expose or []),
                capabilities=kept,
            )
            mode_network, shared = self._resolve_network_mode(container, ip, ports, publish_all)
            with Undo(after_rollback=flush_retired) as undo:
                self.local_store.create(CONTAINER_NAMES + name, container_id)
                undo.push(self.local_store.delete, CONTAINER_NAMES + name)
                self._make_sandbox(container, mode_network, shared, undo)
                if mode_network is not None:
                    self._connect(container, mode_network, ip, aliases or [], undo)
                    if ports or publish_all:
                        self._publish(container, mode_network, undo)
                self._write_etc_files(container)
                self._start_process(container, shared, undo)
                self.local_store.create(CONTAINERS + container_id, container.to_json())
            self.containers[container_id] = container
            self._container_names[name] = container_id
            if hold_removal:
                self._removal_held.add(container_id)
            self._watch_exit(container)
            log.info("started container %s (%s)", name, container.short_id)
            return container

    def _unused_name(self) -> str:
        for _ in range(100):
            name = random_name()
            if self._find_container(name, exact_name=True) is None:
                return name
        return f"{random_name()}_{new_id()[:6]}"

    def _resolve_network_mode(self, container, ip, ports, publish_all) -> tuple[Network | None, Container | None]:
        """The network to join (None for container: mode) and the container whose namespace
        is shared, after checking the mode's rules."""
        mode = container.network_mode
        if mode.startswith("container:"):
            target = self._find_container(mode.split(":", 1)[1])
            if target is None:
                raise NotFound(f"container {mode.split(':', 1)[1]} not found (in --network {mode})")
            if target.state != "running":
                raise Conflict(f"cannot join the network namespace of container {target.name}: it is not running")
            if ports or publish_all:
                raise BadRequest("conflicting options: ports cannot be published in container: network mode (publish them on the other container)")
            if ip:
                raise BadRequest("conflicting options: --ip cannot be used in container: network mode")
            root = self._find_container(target.shares_netns_of) if target.shares_netns_of else target
            container.network_mode = f"container:{target.id}"
            container.netns = root.netns if root else target.netns
            return None, target
        network = self.get_network(mode)
        if self.drivers[network.driver].namespace_mode and (ports or publish_all):
            raise BadRequest(f"conflicting options: ports cannot be published with --network {network.name}")
        if self.drivers[network.driver].namespace_mode and ip:
            raise BadRequest(f"conflicting options: --ip cannot be used with --network {network.name}")
        if ip and network.builtin:
            raise BadRequest("--ip needs a user-defined network: create one with netd network create --subnet ...")
        if (ports or publish_all) and not self.drivers[network.driver].supports_ports:
            raise BadRequest(f"driver {network.driver} cannot publish ports")
        container.network_mode = network.name
        return network, None

    def _make_sandbox(self, container: Container, network: Network | None, shared: Container | None, undo: Undo) -> None:
        run_dir = self.paths.container_run_dir(container.id)
        data_dir = self.paths.container_data_dir(container.id)
        os.makedirs(run_dir, exist_ok=True)
        undo.push(shutil.rmtree, run_dir, True)
        os.makedirs(data_dir, exist_ok=True)
        undo.push(shutil.rmtree, data_dir, True)
        if shared is not None or (network is not None and self.drivers[network.driver].uses_host_namespace):
            return
        container.netns = self.paths.netns(container.id)
        namespaces.create_netns(container.netns)
        undo.push(namespaces.delete_netns, container.netns)
        with namespaces.entered_netns(container.netns):
            # netd's networks are IPv4: without this every interface joining the container runs
            # IPv6 autoconfiguration (DAD, MLD), which made attach 2-3x slower at 1000 endpoints.
            netlink.quiet_namespace()
        self.resolver.add_sandbox(container.id, container.netns)
        undo.push(self.resolver.remove_sandbox, container.id)

    def _write_etc_files(self, container: Container) -> None:
        run_dir = self.paths.container_run_dir(container.id)
        owner = self._netns_owner(container)
        if owner is not container:
            # container: mode shares the other container's view, as Docker does
            for fname in ("hosts", "resolv.conf"):
                shutil.copyfile(os.path.join(self.paths.container_run_dir(owner.id), fname), os.path.join(run_dir, fname))
        else:
            self._write_hosts(container)
            if container.netns:
                resolv = etcfiles.embedded_resolv_conf(self.host_resolv_conf)
            else:
                resolv = self.host_resolv_conf
            etcfiles.write_in_place(os.path.join(run_dir, "resolv.conf"), resolv.render())
        etcfiles.write_in_place(os.path.join(run_dir, "hostname"), container.hostname + "\n")

    def _write_hosts(self, container: Container) -> None:
        if container.external:
            return   # its runtime writes its /etc/hosts
        if container.network_mode == "host":
            with open("/etc/hosts") as f:
                content = f.read()
        else:
            addresses = [e.address for e in self._container_endpoints(container) if e.address]
            content = etcfiles.render_hosts(container.hostname, addresses)
        etcfiles.write_in_place(os.path.join(self.paths.container_run_dir(container.id), "hosts"), content)

    def _start_process(self, container: Container, shared: Container | None, undo: Undo) -> None:
        run_dir = self.paths.container_run_dir(container.id)
        spec = process.ProcessSpec(
            cmd=container.cmd,
            netns_path=container.netns or None,
            hostname=None if container.network_mode == "host" else container.hostname,
            etc_files={
                "/etc/hosts": os.path.join(run_dir, "hosts"),
                "/etc/resolv.conf": os.path.join(run_dir, "resolv.conf"),
                "/etc/hostname": os.path.join(run_dir, "hostname"),
            },
            rootfs=container.rootfs,
            env=container.env,
            log_path=self.paths.log_file(container.id),
            capabilities=None if container.capabilities is None else
            [capabilities.NUMBERS[name] for name in container.capabilities],
        )
        try:
            handle = process.spawn(spec)
        except RuntimeFailure:
            raise
        except (OSError, RuntimeError, ValueError) as e:
            raise BadRequest(f"cannot start {container.cmd[0]}: {e}") from None
        undo.push(process.kill, handle)
        container.pid, container.start_time = handle.pid, handle.start_time
        container.state = "running"
        container.started_at = now()

    # --- containers: exit, stop, remove -----------------------------------------------------

    def _watch_exit(self, container: Container) -> None:
        self._exit_waiters.setdefault(container.id, threading.Event())
        self.reaper.on_exit(container.pid, lambda _pid, code, cid=container.id: self._on_exit(cid, code))

    def _on_exit(self, container_id: str, exit_code: int | None) -> None:
        """The container's process ended: tear down its networking, keep its record."""
        with self.lock:
            container = self.containers.get(container_id)
            if container is None or container.state == "exited":
                return
            container.state = "exited"
            container.exit_code = exit_code
            container.finished_at = now()
            self._teardown_networking(container)
            if container.auto_remove and container_id not in self._removal_held:
                self._delete_container(container)
            else:
                self.local_store.put(CONTAINERS + container.id, container.to_json())
        waiter = self._exit_waiters.pop(container_id, None)
        if waiter:
            waiter.set()
        log.info("container %s exited (%s)", container.name, "unknown code" if exit_code is None else exit_code)

    def _teardown_networking(self, container: Container) -> None:
        for endpoint in reversed(self._container_endpoints(container)):
            network = self.networks.get(endpoint.network_id)
            if network is not None:
                try:
                    self._disconnect_endpoint(container, network, endpoint, exiting=True)
                except Exception as e:  # noqa: BLE001 - free what can be freed
                    log.error("while tearing down %s on %s: %s", container.name, network.name, e)
        self._release_port_reservations(container)
        self.resolver.remove_sandbox(container.id)
        if container.netns and not container.shares_netns_of and not container.external:
            namespaces.delete_netns(container.netns)

    def release_removal(self, container_id: str) -> None:
        with self.lock:
            self._removal_held.discard(container_id)
            container = self.containers.get(container_id)
            if container is not None and container.auto_remove and container.state == "exited":
                self._delete_container(container)

    def wait(self, ref: str, timeout: float | None = None) -> Container:
        container = self.get_container(ref)
        waiter = self._exit_waiters.get(container.id)
        if waiter is not None and container.state == "running":
            waiter.wait(timeout)
        return self.containers.get(container.id, container)

    def stop(self, ref: str, timeout: float = STOP_TIMEOUT) -> Container:
        container = self.get_container(ref)
        refuse_external(container, "stopped")
        if container.state == "running":
            process.stop(process.ProcessHandle(container.pid, container.start_time), timeout)
            self.wait(container.id, timeout=5)
        return container

    def remove(self, ref: str, force: bool = False) -> Container:
        with self.lock:
            container = self.get_container(ref)
            refuse_external(container, "removed")
            dependants = [c.name for c in self.containers.values()
                          if c.shares_netns_of == container.id and c.state == "running"]
            if dependants:
                raise Conflict(f"container {container.name} shares its network with running {', '.join(dependants)}: remove those first")
            if container.state == "running" and not force:
                raise Conflict(f"container {container.name} is running: stop it first or use netd rm -f")
        if container.state == "running":
            process.kill(process.ProcessHandle(container.pid, container.start_time))
            self.wait(container.id, timeout=5)
        with self.lock:
            if container.id in self.containers:
                if container.state == "running":  # no exit notice came: tear down ourselves
                    self._on_exit(container.id, None)
                if container.id in self.containers:
                    self._delete_container(container)
        return container

    def _delete_container(self, container: Container) -> None:
        self.local_store.delete(CONTAINERS + container.id)
        self.local_store.delete(CONTAINER_NAMES + container.name)
        shutil.rmtree(self.paths.container_run_dir(container.id), ignore_errors=True)
        shutil.rmtree(self.paths.container_data_dir(container.id), ignore_errors=True)
        self.containers.pop(container.id, None)
        if self._container_names.get(container.name) == container.id:
            del self._container_names[container.name]

    # --- containers: queries ----------------------------------------------------------------

    def _find_container(self, ref: str | None, exact_name: bool = False) -> Container | None:
        if not ref:
            return None
        by_name = self._container_names.get(ref)
        if by_name is not None:
            return self.containers[by_name]
        if exact_name:
            return None
        if ref in self.containers:
            return self.containers[ref]
        matches = [c for c in list(self.containers.values()) if c.id.startswith(ref)] if len(ref) >= 3 else []
        if len(matches) > 1:
            raise BadRequest(f"container id prefix {ref} is ambiguous: give more characters")
        return matches[0] if matches else None

    # Reads take no lock (never frozen): each reads one table in one step, which CPython does
    # atomically, so `ps`, `inspect` and DNS answer while an operation waits on the store.

    def get_container(self, ref: str) -> Container:
        container = self._find_container(ref)
        if container is None:
            raise NotFound(f"no such container: {ref}")
        return container

    def list_containers(self, all_states: bool = False) -> list[Container]:
        found = [c for c in list(self.containers.values()) if all_states or c.state == "running"]
        return sorted(found, key=lambda c: (c.created, c.id), reverse=True)

    def _container_endpoints(self, container: Container) -> list[Endpoint]:
        found = self.endpoints.of_container(container.id)
        order = {nid: i for i, nid in enumerate(container.networks)}
        return sorted(found, key=lambda e: order.get(e.network_id, len(order)))

    def container_endpoints(self, container: Container) -> list[Endpoint]:
        return self._container_endpoints(container)

    def _netns_owner(self, container: Container) -> Container:
        if container.shares_netns_of:
            return self.containers.get(container.shares_netns_of, container)
        return container

    def netns_owner(self, container: Container) -> Container:
        """The container whose namespace `container` runs in (itself, or the one it shares)."""
        return self._netns_owner(container)

    def local_endpoint(self, endpoint_id: str) -> Endpoint | None:
        """An endpoint on this host, by id."""
        return self.endpoints.get(endpoint_id)

    def container_by_id(self, container_id: str) -> Container | None:
        return self.containers.get(container_id)

    def network_by_id(self, network_id: str) -> Network | None:
        return self.networks.get(network_id)

    def driver_of(self, network: Network) -> Driver | None:
        """The network's driver, None if this daemon does not have it."""
        return self.drivers.get(network.driver)


def refuse_external(container: Container, done: str) -> None:
    """A sandbox netd did not make is changed by its runtime only."""
    if container.external:
        raise Conflict(f"{container.name} is a {container.external} sandbox: it is {done} with {container.external}, not netd")
