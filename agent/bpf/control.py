"""Runtime state of a node's datapath, through its pinned maps: no bcc, no compile.

The agent is the one writer: the node's config, enrolled workloads, exclusions, tunnel and node
addresses, the mesh's ports, per-port mTLS modes, and the programs it attaches outside the
node's cgroup (plain.c per workload namespace, own.c on the node's namespace, tunops.c on the
tunnel's cgroup). The programs and their pins themselves are loader.py's.
"""

from __future__ import annotations

import contextlib
import errno
import os

from ..errors import DabbaError
from . import features, names
from . import sys as bpfsys
from .loader import (
    Datapath,
    FamilyProgram,
    OwnProgram,
    PlainProgram,
    Program,
    TunnelOpsProgram,
)


class DatapathControl:
    """Runtime state of a node's datapath, through its pinned maps (no bcc).

    The one writer of dabba_cfg, dabba_wl, the exclusion maps and
    dabba_tun_addr: the agent.
    """

    def __init__(self, dp: Datapath):
        self.dp = dp

    def configure(
        self,
        tunnel_ip: str,
        tunnel_port: int,
        tunnel_mark: int = 0,
        enabled: bool = True,
        pass_non_tcp: bool = False,
        hbone_port: int = 0,
        max_open: int = 0,
        tunnel_ip6: str = "",
        eject: tuple[int, float, float] = (3, 30.0, 0.5),
        spread: tuple[int, int] = (0, 0),
    ) -> None:
        """The node's runtime config. pass_non_tcp: enrolled workloads' UDP, raw and other
        non-TCP sockets pass unmeshed; otherwise only DNS (port 53) and loopback leave.
        hbone_port: the tunnel's HBONE port, owned by own.c like tunnel_ip:tunnel_port.
        max_open: captured connections one workload may hold open (connect.c); 0: no limit.
        tunnel_ip6: the outbound listener's IPv6 address (port tunnel_port); empty: native IPv6
        of the workloads is refused. eject: services' outlier ejection in the kernel (consecutive
        failed connects, base seconds, most of a service's endpoints out). spread: (first port,
        count) of tunnel_ip a captured connect() goes to, one at random, which own.c hands to
        the outbound listener; (0, 0): tunnel_port alone."""
        from . import abi

        flags = abi.CFG_PASS_NON_TCP if pass_non_tcp else 0
        gen = self.config().verdict_gen  # the verdicts in force stay in force
        cfg = abi.Config(
            abi.ip_be(tunnel_ip),
            tunnel_port,
            1 if enabled else 0,
            tunnel_mark,
            flags,
            hbone_port,
            max_open,
            0,
            abi.ip6(tunnel_ip6) if tunnel_ip6 else abi.Ip6(),
            gen,
            eject[0],
            round(eject[2] * 100),
            round(eject[1] * 1000),
            spread[0],
            spread[1],
        )
        with self.dp.open_map(names.MAP_CFG) as m:
            m.update(abi.ctypes.c_uint32(0), cfg)

    def config(self):
        """The node's runtime config as the kernel holds it (all zero before configure())."""
        from . import abi

        with self.dp.open_map(names.MAP_CFG) as m:
            raw = m.lookup(abi.ctypes.c_uint32(0))
        return abi.from_bytes(abi.Config, raw) if raw else abi.Config()

    def set_verdicts(self, entries: dict[tuple[int, str, int], tuple[int, bool]]) -> int:
        """Replace the same-node verdicts, atomically: (source cgroup id, destination address,
        port or 0) -> (rule, allowed). The new generation is written whole, then put in force
        with one update of the config (a connect() reads it once), then the old one goes; a
        connect() racing the switch finds either generation whole, or no entry (the tunnel
        decides it). An empty table puts generation 0 in force: no verdicts. Returns the
        generation now in force."""
        from . import abi

        cur = self.config()
        old = cur.verdict_gen
        new = 0 if not entries else (old % 0xFFFFFFFF) + 1
        with self.dp.open_map(names.MAP_VERDICT) as m:
            try:
                for (cg, ip, port), (rule, allowed) in entries.items():
                    m.update(
                        abi.VerdictKey(cg, abi.ip6(ip), new, port, 0),
                        abi.Verdict(rule, 1 if allowed else 0),
                    )
            except OSError:  # the map is full: the generation in force stays, whole
                for k in list(m.keys()):
                    if abi.from_bytes(abi.VerdictKey, k).gen == new:
                        m.delete(k)
                raise
            cur.verdict_gen = new
            with self.dp.open_map(names.MAP_CFG) as c:
                c.update(abi.ctypes.c_uint32(0), cur)
            for k in list(m.keys()):
                if abi.from_bytes(abi.VerdictKey, k).gen != new:
                    m.delete(k)
        return new

    def set_services(self, want: dict[tuple[str, int], tuple[str, int, list[str]]]) -> int:
        """Replace the services the kernel resolves (connect.c): (VIP, port) -> (lb policy,
        target port, endpoint addresses). A service whose endpoints change gets its new set
        written whole under a new id before its entry points at it (one update), and the old
        set goes after: a connect() finds either set whole. An unchanged service keeps its
        entry and its round-robin turn. Endpoints no service has any more lose their load and
        health. Returns how many (VIP, port) entries are in force."""
        import time

        from . import abi

        def ip_of(b: bytes) -> str:
            return abi.ip6_str(abi.from_bytes(abi.Ip6, b))

        with (
            self.dp.open_map(names.MAP_SVC) as svcs,
            self.dp.open_map(names.MAP_SVC_EP) as slots,
            self.dp.open_map(names.MAP_LB_EP) as states,
        ):
            have: dict[tuple[str, int], abi.Svc] = {}
            for k in list(svcs.keys()):
                key = abi.from_bytes(abi.SvcKey, k)
                raw = svcs.lookup(key)
                if raw:
                    have[(ip_of(bytes(key.vip)), key.port)] = abi.from_bytes(abi.Svc, raw)
            sets: dict[int, dict[int, str]] = {}
            for k in list(slots.keys()):
                sk = abi.from_bytes(abi.SvcSlot, k)
                raw = slots.lookup(sk)
                if raw:
                    sets.setdefault(sk.id, {})[sk.slot] = ip_of(raw)
            next_id = max([*sets, *(v.id for v in have.values()), 0]) + 1
            in_force: set[int] = set()  # the sets the entries point at once we are done
            for (vip, port), (policy, target, eps) in want.items():
                eps = eps[: abi.SVC_EP_MAX]
                cur = have.get((vip, port))
                code = abi.LB_POLICIES[policy]
                if (
                    cur is not None
                    and (cur.count, cur.target_port, cur.policy) == (len(eps), target, code)
                    and [sets.get(cur.id, {}).get(i) for i in range(cur.count)] == eps
                ):
                    in_force.add(cur.id)
                    continue
                sid, next_id = next_id, next_id + 1
                for i, ip in enumerate(eps):
                    # its state first: connect() takes a set whose endpoint has none for torn
                    try:
                        states.update(
                            abi.IpPort(abi.ip6(ip), target, 0), abi.EpState(), bpfsys.BPF_NOEXIST
                        )
                    except bpfsys.BPFError as e:
                        if e.errno != errno.EEXIST:
                            raise
                        # known already: its load and health stay
                    slots.update(abi.SvcSlot(sid, i), abi.ip6(ip))
                svcs.update(
                    abi.SvcKey(abi.ip6(vip), port, 0),
                    abi.Svc(sid, cur.rr if cur else 0, len(eps), target, code),
                )
                in_force.add(sid)
            for vip, port in have:
                if (vip, port) not in want:
                    svcs.delete(abi.SvcKey(abi.ip6(vip), port, 0))
            # a connect() that read an entry just replaced is still picking from its old set
            # for a few microseconds: the old sets go a little later
            if any(sid not in in_force for sid in sets):
                time.sleep(0.05)
            for sid, members in sets.items():
                if sid not in in_force:
                    for i in members:
                        slots.delete(abi.SvcSlot(sid, i))
            keep = {(abi.ip6_key(ip), t) for _, t, eps in want.values() for ip in eps}
            for k in list(states.keys()):
                ipp = abi.from_bytes(abi.IpPort, k)
                if (bytes(ipp.ip), ipp.port) not in keep:
                    states.delete(ipp)
        return len(want)

    def services(self) -> dict[tuple[str, int], dict]:
        """The services the kernel resolves, with each endpoint's load and health as sockops
        keeps them: (VIP, port) -> {policy, target_port, endpoints: [{ip, active, failures,
        ejected_s}]}."""
        import time

        from . import abi

        policies = {v: k for k, v in abi.LB_POLICIES.items()}
        now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        out = {}
        with (
            self.dp.open_map(names.MAP_SVC) as svcs,
            self.dp.open_map(names.MAP_SVC_EP) as slots,
            self.dp.open_map(names.MAP_LB_EP) as states,
        ):
            for k in list(svcs.keys()):
                key = abi.from_bytes(abi.SvcKey, k)
                raw = svcs.lookup(key)
                if not raw:
                    continue
                v = abi.from_bytes(abi.Svc, raw)
                eps = []
                for i in range(v.count):
                    ip = slots.lookup(abi.SvcSlot(v.id, i))
                    if not ip:
                        continue
                    st_raw = states.lookup(
                        abi.IpPort(abi.from_bytes(abi.Ip6, ip), v.target_port, 0)
                    )
                    st = abi.from_bytes(abi.EpState, st_raw) if st_raw else abi.EpState()
                    eps.append(
                        {
                            "ip": abi.ip6_str(abi.from_bytes(abi.Ip6, ip)),
                            "active": st.active,
                            "failures": st.failures,
                            "ejected_s": round(max(st.ejected_until - now, 0) / 1e9, 1),
                        }
                    )
                out[(abi.ip6_str(key.vip), key.port)] = {
                    "policy": policies.get(v.policy, str(v.policy)),
                    "target_port": v.target_port,
                    "endpoints": eps,
                }
        return out

    def enrol(self, cgroup_path: str, workload_id: int, flags: int) -> int:
        """Enrol the workload whose cgroup is cgroup_path; returns its cgroup id."""
        from . import abi

        cg_id = cgroup_id(cgroup_path)
        with self.dp.open_map(names.MAP_WORKLOADS) as m:
            m.update(abi.ctypes.c_uint64(cg_id), abi.Workload(workload_id, flags))
        return cg_id

    def unenrol(self, cgroup_path_or_id: str | int) -> bool:
        from . import abi

        cg_id = (
            cgroup_path_or_id
            if isinstance(cgroup_path_or_id, int)
            else cgroup_id(cgroup_path_or_id)
        )
        with self.dp.open_map(names.MAP_WORKLOADS) as m:
            return m.delete(abi.ctypes.c_uint64(cg_id))

    def steer_plaintext(self, netns_path: str) -> bool:
        """Attach plain.c to a workload's network namespace (once); True if attached now."""
        prog = next(p for p in self.dp.programs if isinstance(p, PlainProgram))
        return self._attach_netns(prog, netns_path, prog.netns_link_pin, "workload")

    def own_listeners(self, netns_path: str = "/proc/self/ns/net") -> bool:
        """Attach own.c to the node's network namespace (once); True if attached now."""
        prog = next(p for p in self.dp.programs if isinstance(p, OwnProgram))
        return self._attach_netns(prog, netns_path, lambda _ino: prog.link_pin, "node")

    def trust_tunnel_cgroup(self, cgroup_path: str) -> bool:
        """Attach tunops.c to the tunnel's cgroup (moving it there if it was elsewhere); True if
        attached now. Refused for a cgroup that holds the node's workloads or every process."""
        prog = next(p for p in self.dp.programs if isinstance(p, TunnelOpsProgram))
        real = os.path.realpath(cgroup_path)
        node = os.path.realpath(self.dp.cgroup)
        if (
            real == os.path.realpath(features.cgroup2_root())
            or node.startswith(real + "/")
            or (node == real)
        ):
            raise DabbaError(
                f"the tunnel runs in cgroup {cgroup_path}, which holds other processes than "
                f"the tunnel's (the cgroup v2 root, or the workloads' {self.dp.cgroup}): its "
                "connections cannot be told from theirs",
                hint="run the tunnel in a cgroup of its own (dabba-tunnel.service, the agent's "
                "service, or a container)",
            )
        cg_id = cgroup_id(real)
        if os.path.exists(prog.link_pin):
            lfd = bpfsys.obj_get(prog.link_pin)
            try:
                if bpfsys.link_info(lfd).cgroup_id == cg_id:
                    return False
            finally:
                os.close(lfd)
            os.unlink(prog.link_pin)  # the tunnel moved: its old cgroup is trusted no more
        cg = os.open(real, os.O_RDONLY | os.O_DIRECTORY)
        pfd = bpfsys.obj_get(prog.prog_pin)
        try:
            prog.attach(pfd, cg)
        finally:
            os.close(pfd)
            os.close(cg)
        return True

    def _attach_netns(self, prog: Program, netns_path: str, pin_of, whose: str) -> bool:
        """Attach an sk_lookup program to a network namespace through a pinned link (pin_of:
        the namespace's inode -> pin path), unless that pin exists; True if attached now."""
        try:
            ns = os.open(netns_path, os.O_RDONLY)
        except OSError as e:
            raise DabbaError(f"{whose} network namespace {netns_path}: {e.strerror}") from None
        try:
            pin = pin_of(os.fstat(ns).st_ino)
            if os.path.exists(pin):
                return False
            pfd = bpfsys.obj_get(prog.prog_pin)
            try:
                link = bpfsys.link_create(pfd, ns, prog.attach_type, f"sk_lookup on {netns_path}")
                try:
                    bpfsys.obj_pin(link, pin)
                finally:
                    os.close(link)
            finally:
                os.close(pfd)
            return True
        finally:
            os.close(ns)

    def unsteer_plaintext(self, keep_netns_inos: set[int]) -> int:
        """Remove the sk_lookup links of every namespace not in keep; returns how many."""
        prog = next(p for p in self.dp.programs if isinstance(p, PlainProgram))
        gone = 0
        for f in os.listdir(self.dp.pins.links):
            if (
                f.startswith(f"{prog.function}_")
                and int(f.rsplit("_", 1)[1]) not in keep_netns_inos
            ):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(os.path.join(self.dp.pins.links, f))
                    gone += 1
        return gone

    def workloads(self) -> dict[int, tuple[int, int]]:
        """cgroup id -> (workload id, flags)."""
        from . import abi

        out = {}
        with self.dp.open_map(names.MAP_WORKLOADS) as m:
            for k, v in m.items():
                w = abi.from_bytes(abi.Workload, v)
                out[int.from_bytes(k, "little")] = (w.id, w.flags)
        return out

    def set_exclusions(self, cidrs: list[str], ports: list[int]) -> None:
        """Replace the capture exclusions: destination CIDRs and ports that go direct."""
        import ipaddress

        from . import abi

        nets = []
        for c in cidrs:
            try:
                n = ipaddress.ip_network(c, strict=False)
            except ValueError:
                raise DabbaError(f"capture exclusion {c!r} is not an IPv4 or IPv6 CIDR") from None
            mapped = 96 if n.version == 4 else 0  # IPv4 as IPv4-mapped (include/types.h)
            nets.append(abi.Lpm(n.prefixlen + mapped, abi.ip6(str(n.network_address))))
        for p in ports:
            if not 0 < int(p) < 65536:
                raise DabbaError(f"capture exclusion port {p!r} is out of range")
        self._replace_keys(names.MAP_EXCL_NET, {bytes(n) for n in nets})
        self._replace_keys(names.MAP_EXCL_PORT, {int(p).to_bytes(2, "little") for p in ports})

    def set_tunnel_addrs(self, addrs: list[str]) -> None:
        """Replace the addresses STRICT workloads accept connections from (both families)."""
        from . import abi

        self._replace_keys(names.MAP_TUNNEL_ADDRS, {abi.ip6_key(a) for a in addrs})

    def set_node_addrs(self, addrs: list[str]) -> None:
        """Replace the node's own addresses (both families): never a workload's destination."""
        from . import abi

        self._replace_keys(names.MAP_NODE_IPS, {abi.ip6_key(a) for a in addrs})

    def set_port_mtls(self, modes: dict[tuple[str, int], str]) -> None:
        """Replace the per-port PeerAuthentication modes: (workload ip, port) -> mode."""
        from . import abi

        strict = {True: bytes([abi.MTLS_STRICT]), False: bytes([abi.MTLS_PLAINTEXT])}
        self._replace_keys(
            names.MAP_PORT_MTLS,
            {
                bytes(abi.IpPort(abi.ip6(ip), port, 0)): strict[mode == "STRICT"]
                for (ip, port), mode in modes.items()
            },
        )

    def set_mesh_ports(self, ports: list[int]) -> None:
        """Replace the mesh's own ports: never a workload's destination."""
        self._replace_keys(names.MAP_MESH_PORTS, {int(p).to_bytes(2, "little") for p in ports})

    def _replace_keys(self, map_name: str, want: set[bytes] | dict[bytes, bytes]) -> None:
        """Make a map hold exactly the keys in want: a set (value 1 each, a set-like map) or a
        dict of values."""
        values = want if isinstance(want, dict) else dict.fromkeys(want, b"\x01")
        with self.dp.open_map(map_name) as m:
            for k in list(m.keys()):
                if k not in values:
                    m.delete(k)
            for k, v in values.items():
                m.update(k, v)

    def stats(self) -> dict[str, int]:
        """dabba_stats summed over CPUs, by name."""
        from . import abi

        out = {}
        with self.dp.open_map(names.MAP_STATS) as m:
            for st in abi.Stat:
                slots = m.lookup_percpu(abi.ctypes.c_uint32(int(st)))
                out[st.name.lower()] = sum(int.from_bytes(s, "little") for s in slots)
        return out

    def packet_sockets_refused(self) -> tuple[bool, str]:
        """Whether enrolled workloads' packet sockets are refused here: (True, how) or
        (False, why not).

        Not whether family.c is pinned but whether it runs: it counts every socket of a
        family with no path through the mesh, anyone's, so this process (no workload, so
        allowed) opens one, closes it, and looks at the count.
        """
        import socket

        from . import abi

        prog = next(p for p in self.dp.programs if isinstance(p, FamilyProgram))
        if not os.path.exists(prog.link_pin):
            return False, features.bpf_lsm_missing()
        seen = abi.Stat.FAMILY_SEEN.name.lower()
        before = self.stats()[seen]
        failed = None
        try:
            socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0).close()
        except OSError as e:  # the hook runs before the family is looked up: it still counts
            failed = e  # (a kernel whose af_packet module is not loaded says EAFNOSUPPORT)
        if self.stats()[seen] > before:
            return True, f"refused in the kernel ({prog.hook})"
        if failed is not None:
            return False, f"the probe could not open a packet socket ({failed.strerror})"
        return False, f"{prog.hook} is attached but does not run: {features.bpf_lsm_missing()}"

    def open_connections(self) -> dict[int, int]:
        """Captured connections each workload holds open, by cgroup id (max_open's count)."""
        with self.dp.open_map(names.MAP_WL_OPEN) as m:
            return {
                int.from_bytes(k, "little"): int.from_bytes(v, "little")
                for k, v in m.items()
                if int.from_bytes(v, "little")
            }

    def guard_drops(self) -> dict[int, int]:
        """Ingress-guard drops per workload cgroup id."""
        with self.dp.open_map(names.MAP_GUARD_COUNT) as m:
            return {int.from_bytes(k, "little"): int.from_bytes(v, "little") for k, v in m.items()}


def cgroup_id(path: str) -> int:
    """The cgroup v2 id of a cgroup folder (its inode number), checked."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise DabbaError(
            f"unknown cgroup path {path}: no such cgroup",
            hint="workload cgroups must exist below the cgroup v2 mount before they are enrolled",
        ) from None
    features.require_cgroup2(path)
    import stat as _stat

    if not _stat.S_ISDIR(st.st_mode):
        raise DabbaError(f"unknown cgroup path {path}: not a cgroup folder")
    return st.st_ino
