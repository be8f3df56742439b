"""Same-node verdicts of one node: the node's policies compiled into the kernel's table
(verdicts.py, connect.c), put in force one generation at a time, and the established direct
flows a change denies ended (SOCK_DESTROY, destroy.py). The agent owns one."""

from __future__ import annotations

import errno

from .. import log

_log = log.get("agent")
VERDICT_MAX = 65536  # DABBA_VERDICT_MAX (include/config.h)


class SameNode:
    """What the kernel holds, and every decision a rule index ever named (flow records carry
    the index; an index is a hash of its decision, the same across agent restarts)."""

    def __init__(self, agent):
        self.a = agent  # its config, datapath control, enrolled workloads and snapshot views
        self.verdicts: dict | None = None
        self.rule_ids: dict[tuple, int] = {}
        self.rules: dict[int, object] = {}
        self.generation = 0
        self.left_out: dict[str, str] = {}
        self.reset = 0  # direct flows a policy change ended
        self._lacks: str | None = None  # why this kernel cannot run the direct path

    def kernel_lacks(self) -> str:
        """Why this kernel cannot run the same-node path ("" when it can). Direct flows must be
        ended when a policy change denies them (no proxy holds them): without SOCK_DESTROY they
        could not be, so same-node connections keep the tunnel's path, which can."""
        if self._lacks is None:
            from .destroy import supported

            self._lacks = supported()
            if self._lacks:
                _log.warning(f"same-node connections go through the tunnel: {self._lacks}")
        return self._lacks

    def status(self) -> dict:
        cap = self.a.cfg.capture
        lacks = self.kernel_lacks() if cap.enabled and cap.same_node == "direct" else ""
        return {
            "mode": ("tunnel" if lacks else cap.same_node) if cap.enabled else "off",
            "kernel_lacks": lacks,
            "generation": self.generation,
            "verdicts": len(self.verdicts or {}),
            "left_out": self.left_out,
            "direct_flows_reset": self.reset,
        }

    def rule_id(self, d) -> int:
        """The index a flow record names a decision by: a hash of the decision, so that an
        agent restarted under open flows names their decisions as the one before did."""
        import zlib

        k = (d.allowed, d.reason, d.policy, d.rule, d.origin)
        if k not in self.rule_ids:
            i = zlib.crc32(repr(k).encode()) or 1
            while i in self.rules:  # a collision: the next free one
                i = (i % 0xFFFFFFFF) + 1
            self.rule_ids[k] = i
            self.rules[i] = d
        return self.rule_ids[k]

    def sync(self, snap, certs) -> None:
        """Compile the node's policies into same-node verdicts (verdicts.py) for its enrolled,
        capturing workloads that hold their certificate, put them in force (one generation,
        atomically), then end the direct flows they no longer allow."""
        from ..control.convert import policy_from_pb, root_of
        from ..control.model import Workload
        from .verdicts import Endpoint, compile_verdicts

        cap = self.a.cfg.capture
        policies = [policy_from_pb(p, root_of(snap)) for p in snap.policies]
        entries: dict = {}
        left_out: dict[str, str] = {}
        if cap.enabled and cap.same_node == "direct" and not self.kernel_lacks():
            local = []
            for cg, key in self.a.workload_ids.items():
                w = self.a._by_key.get(key)
                if w is None or key not in certs or w.node != self.a.cfg.node:
                    continue  # held workloads keep the tunnel, which refuses them, saying why
                model = Workload(
                    w.name, w.namespace, w.service_account, w.node, w.ip, dict(w.labels),
                    ip6=w.ip6,
                )  # fmt: skip
                local.append(Endpoint(cg, model, w.spiffe_id))
            # half the map: the generation in force and the next one are both in it, briefly
            c = compile_verdicts(policies, local, limit=VERDICT_MAX // 2)
            left_out = c.left_out
            for k, rule in c.entries.items():
                d = c.rules[rule - 1]
                entries[k] = (self.rule_id(d), d.allowed)
        if left_out != self.left_out:
            for what, why in left_out.items():
                _log.warning(
                    f"same-node connections to {what} go through the tunnel: {why}",
                )
            self.left_out = left_out
        if entries == self.verdicts:
            return
        try:
            self.generation = self.a.ctl.set_verdicts(entries)
        except OSError as e:
            _log.error(f"same-node verdicts not updated, the last ones stay in force: {e}")
            return
        self.verdicts = entries
        _log.info(
            "same-node verdicts in force",
            fields={"generation": self.generation, "verdicts": len(entries)},
        )
        self.recheck(policies)

    def recheck(self, policies) -> int:
        """End each established direct flow the policies deny now: SOCK_DESTROY on the client's
        socket, in its namespace (its peer gets a reset). A flow the verdicts no longer cover
        (a left-out destination) is checked by evaluate() all the same."""
        from ..control.model import Workload
        from ..ztunnel.policy import Request, evaluate
        from .destroy import destroy

        ended = 0
        for rec in self.a.live_records():
            if not rec.direct or rec.direction != "outbound" or rec.end is not None:
                continue
            key = self.a.workload_ids.get(rec.cgroup_id, "")
            src, dst = self.a._by_key.get(key), self.a._by_ip.get(rec.dst[0])
            if src is None or dst is None:
                allowed, why = False, "one of its workloads is gone"
            else:
                model = Workload(
                    dst.name, dst.namespace, dst.service_account, dst.node, dst.ip,
                    dict(dst.labels), ip6=dst.ip6,
                )  # fmt: skip
                d = evaluate(policies, model, Request(rec.src[0], rec.dst[0], rec.dst[1],
                                                      src.spiffe_id))  # fmt: skip
                allowed, why = d.allowed, d.reason
            if allowed:
                continue
            # the destination's end first: its client sees a reset (ECONNRESET), as from a
            # tunnel that ends a flow; the client's own end when the destination's is not found
            ends = []
            if dst is not None:
                ends.append(
                    (self.a._netns.get(f"{dst.namespace}/{dst.name}", ""), rec.dst, rec.src)
                )
            ends.append((self.a._netns.get(key, ""), rec.src, rec.dst))
            try:
                for i, (netns, local, peer) in enumerate(ends):
                    try:
                        if not netns:
                            raise OSError(errno.ENOENT, "its network namespace is unknown")
                        destroy(netns, local, peer)
                        break
                    except OSError:
                        if i == len(ends) - 1:
                            raise
            except OSError as e:
                _log.error(
                    "a direct flow the policy now denies could not be ended",
                    fields={"src": key, "dst": f"{rec.dst[0]}:{rec.dst[1]}", "error": str(e)},
                )
                continue
            ended += 1
            _log.info(
                "established direct flow ended: policy now denies it",
                fields={"src": key, "dst": f"{rec.dst[0]}:{rec.dst[1]}", "reason": why},
            )
        self.reset += ended
        return ended
