"""Services of one node resolved in the kernel (connect.c), like Cilium's socket-level load
balancing: each VIP and port of the snapshot's services, with its endpoints' addresses, its
target port and its lbPolicy, written to the kernel's service maps (DatapathControl
.set_services). A connect() to a VIP then goes to an endpoint the kernel picked: straight to it
on this node when a same-node verdict allows it, else through the tunnel with the endpoint
already chosen. Only with capture.same_node: direct; with tunnel, the tunnel resolves VIPs as
before. The agent owns one."""

from __future__ import annotations

import ipaddress

from .. import log

_log = log.get("agent")
SVC_MAX = 4096  # DABBA_SVC_MAX (include/config.h)


def compile_services(snap) -> tuple[dict, dict[str, str]]:
    """The kernel's services for a snapshot: (VIP, port) -> (lb policy, target port, endpoint
    addresses in the snapshot's order), and the services left to the tunnel, with why."""
    from ..bpf import abi

    workloads = {f"{w.namespace}/{w.name}": w for w in snap.workloads}
    out: dict = {}
    left_out: dict[str, str] = {}
    for s in snap.services:
        name = f"{s.namespace}/{s.name}"
        if s.waypoint and s.waypoint_pods:
            continue  # the tunnel takes its connections to its waypoint (HBONE, to the VIP)
        try:
            v6 = ipaddress.ip_address(s.vip).version == 6
        except ValueError:
            left_out[name] = f"its VIP {s.vip!r} is not an address"
            continue
        eps = []
        for key in s.endpoints:
            w = workloads.get(key)
            ip = (w.ip6 if v6 else w.ip) if w is not None else ""
            if ip:
                eps.append(ip)
        if len(eps) > abi.SVC_EP_MAX:
            left_out[name] = f"{len(eps)} endpoints, more than the kernel's {abi.SVC_EP_MAX}"
            continue
        policy = s.lb_policy or "round_robin"
        if policy not in abi.LB_POLICIES:
            left_out[name] = f"lbPolicy {policy!r} is not one the kernel knows"
            continue
        if len(out) + len(s.ports) > SVC_MAX:
            left_out[name] = f"the kernel's table holds {SVC_MAX} service ports"
            continue
        for p in s.ports:
            out[(s.vip, p.port)] = (policy, p.target_port, list(eps))
    return out, left_out


class KernelServices:
    def __init__(self, agent):
        self.a = agent
        self.services: dict | None = None
        self.left_out: dict[str, str] = {}

    def sync(self, snap, certs=None) -> None:
        """Put the snapshot's services in force in the kernel (none unless same_node: direct).
        When the kernel's maps refuse them, the last ones stay in force, and the error says
        why."""
        cap = self.a.cfg.capture
        want, left_out = (
            compile_services(snap) if cap.enabled and cap.same_node == "direct" else ({}, {})
        )
        if left_out != self.left_out:
            for what, why in left_out.items():
                _log.warning(f"service {what} is resolved by the tunnel, not the kernel: {why}")
            self.left_out = left_out
        if want == self.services:
            return
        try:
            n = self.a.ctl.set_services(want)
        except OSError as e:
            _log.error(f"services in the kernel not updated, the last ones stay in force: {e}")
            return
        self.services = want
        _log.info("services resolved in the kernel", fields={"service_ports": n})

    def why_tunnel(self) -> str:
        """Why the tunnel, not the kernel, resolves every VIP of this node ("" when the kernel
        does)."""
        cap = self.a.cfg.capture
        if not cap.enabled:
            return "capture is off"
        if cap.same_node != "direct":
            return "capture.same_node is tunnel"
        return "" if self.services is not None else "not written to the kernel yet"

    def status(self) -> dict:
        """The services the kernel resolves, their endpoints' load and health."""
        try:
            held = self.a.ctl.services()
        except OSError as e:
            return {"error": str(e)}
        return {
            "service_ports": len(held),
            "left_out": self.left_out,
            "services": {
                f"{vip}:{port}" if ":" not in vip else f"[{vip}]:{port}": v
                for (vip, port), v in sorted(held.items())
            },
        }
