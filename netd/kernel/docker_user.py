"""Living beside Docker: netd's accept rules in Docker's DOCKER-USER chain (when Docker set the FORWARD
policy to DROP), written with the iptables command, as Docker writes its own."""

from __future__ import annotations

import logging
import os
import subprocess

from netd.kernel.firewall_elements import DOCKER_USER

log = logging.getLogger(__name__)


class DockerUser:
    """The Firewall's part that keeps netd's bridges accepted in DOCKER-USER."""

    # --- Docker -------------------------------------------------------------------------------

    def reconcile_docker_user(self) -> None:
        """Re-check the host (FORWARD policies, DOCKER-USER, br_netfilter), updating self.report:
        if Docker started after netd, accept netd's bridges in its DOCKER-USER chain; if netd's
        rules there went missing (a firewall reload), put them back. Cheap when nothing changed:
        in-process nftables queries only, with the nf_tables iptables backend."""
        with self._lock:
            self._inspect_host()
            self._sync_docker_user(full=False)

    # --- internals: DOCKER-USER ---------------------------------------------------------------
    #
    # netd changes DOCKER-USER with the iptables command rather than with libnftables: Docker
    # itself manages its chains with iptables, which is iptables-nft or iptables-legacy depending
    # on the host (with legacy the chain is not in nftables at all), and iptables-nft keeps the
    # comment as an xtables match that libnftables can neither write nor read back (nft warns
    # "table ip filter is managed by iptables-nft, do not touch!"). The iptables command writes
    # rules exactly as Docker and `iptables -S` expect, on either backend. It costs a process
    # (a few ms), and only on hosts with DOCKER-USER, only when a network comes or goes: ports
    # never need it, since "-o BRIDGE" covers DNATed traffic. The rules are inserted at the top,
    # before Docker's final "-j RETURN".

    def _detect_iptables_backend(self) -> str:
        if self._iptables is None:
            return ""
        version = self._iptables_cmd(["-V"])
        if version is None or version.returncode != 0:
            return ""
        return "nf_tables" if "nf_tables" in version.stdout else "legacy"

    def _iptables_cmd(self, args: list[str], stdin: str | None = None,
                      command: str | None = None) -> subprocess.CompletedProcess | None:
        program = command or self._iptables
        if program is None:
            return None
        with self._in_netns():
            try:
                return subprocess.run([program, *args], input=stdin, capture_output=True, text=True, timeout=30)
            except (OSError, subprocess.TimeoutExpired) as e:
                log.warning("%s %s failed: %s", program, " ".join(args), e)
                return None

    def _docker_user_exists(self) -> bool:
        if self._iptables_backend == "nf_tables" or not self._iptables:
            return self._list(f"chain ip filter {DOCKER_USER}") is not None
        result = self._iptables_cmd(["-S", DOCKER_USER])
        return result is not None and result.returncode == 0

    def _docker_user_rules(self) -> set[tuple[str, str]]:
        """netd's rules in DOCKER-USER as (direction "i"/"o", bridge)."""
        result = self._iptables_cmd(["-S", DOCKER_USER])
        if result is None or result.returncode != 0:
            return set()
        found = set()
        for line in result.stdout.splitlines():
            m = self._docker_rule_re.match(line.strip())
            if m:
                found.add((m["dir"], m["bridge"]))
        return found

    def _nft_docker_user_accepts(self) -> set[tuple[str, str]] | None:
        """(cheap) the commented accepts by interface in DOCKER-USER as nftables sees them, or None
        if that cannot tell (legacy backend)."""
        if self._iptables_backend != "nf_tables":
            return None
        objects = self._list(f"chain ip filter {DOCKER_USER}") or []
        found = set()
        for obj in objects:
            expr = obj.get("rule", {}).get("expr", [])
            if {"accept": None} not in expr or not any("xt" in e for e in expr):
                continue
            for e in expr:
                m = e.get("match", {})
                key = m.get("left", {}).get("meta", {}).get("key") if isinstance(m.get("left"), dict) else None
                if key in ("iifname", "oifname") and m.get("op") == "==" and isinstance(m.get("right"), str):
                    found.add((key[0], m["right"]))
        return found

    def _apply_docker_user(self, add: list[tuple[str, str]], delete: list[tuple[str, str]]) -> bool:
        if not add and not delete:
            return True
        lines = ["*filter"]
        rule = "-{} {} -m comment --comment " + self._docker_comment + " -j ACCEPT"
        lines += [f"-D {DOCKER_USER} " + rule.format(d, b) for d, b in delete]
        lines += [f"-I {DOCKER_USER} " + rule.format(d, b) for d, b in add]
        lines.append("COMMIT")
        # iptables -> iptables-restore, iptables-legacy -> iptables-legacy-restore: the same backend.
        restore = f"{self._iptables}-restore" if self._iptables else ""
        if not os.path.exists(restore):
            log.warning("could not update %s: %s not found", DOCKER_USER, restore or "iptables")
            return False
        result = self._iptables_cmd(["--noflush", "-w"], stdin="\n".join(lines) + "\n", command=restore)
        if result is None or result.returncode != 0:
            log.warning("could not update %s: %s", DOCKER_USER, result.stderr.strip() if result else "no iptables")
            return False
        return True

    def _add_docker_user_rules(self, bridges: list[str]) -> None:
        todo = [(d, b) for b in bridges for d in ("o", "i")]
        if self._apply_docker_user(todo, []):
            self._docker_user_bridges.update(bridges)
        else:
            self._sync_docker_user(full=True)

    def _remove_docker_user_rules(self, bridges: list[str]) -> None:
        mine = [b for b in bridges if b in self._docker_user_bridges]
        if not mine:
            return
        if not self._apply_docker_user([], [(d, b) for b in mine for d in ("o", "i")]):
            self._sync_docker_user(full=True)
        self._docker_user_bridges.difference_update(mine)

    def _sync_docker_user(self, full: bool) -> None:
        """Make netd's DOCKER-USER rules exactly one accept in and one out per netd bridge."""
        if not self.report.docker_user_chain:
            self._docker_user_bridges.clear()
            return
        bridges = {n.bridge for n in self._networks.values()}
        want = {(d, b) for b in bridges for d in ("i", "o")}
        if not full:
            seen = self._nft_docker_user_accepts()
            if seen is not None and want <= seen and bridges == self._docker_user_bridges:
                return
        have = self._docker_user_rules()
        if self._apply_docker_user(sorted(want - have), sorted(have - want)):
            self._docker_user_bridges = set(bridges)
