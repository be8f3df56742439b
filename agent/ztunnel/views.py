"""The tunnel's admin views (15000: /config_dump, /connections, /stats, /flows) and its merged
15020 /metrics, served by admin.py."""

from __future__ import annotations

import dataclasses
import json
import os
import urllib.parse
from collections import Counter

from .. import certread, log
from . import admin, hbone
from .metrics import merge_exposition

_log = log.get("tunnel")


class Views:
    """Tunnel's part: what the admin port and the metrics port show."""

    async def merged_metrics(self) -> tuple[int, str]:
        """The tunnel's metrics and the agent's (kernel byte counts, certificates, maps), like
        Istio's merged 15020: one scrape target per node."""
        _, mine = self.metrics.render()
        try:
            status, body = await admin.get_unix(self._agent_sock(), "/metrics", timeout=3)
            if status == 200:
                return 200, merge_exposition(mine, body.decode())
            why = f"status {status}"
        except (OSError, TimeoutError, ValueError, IndexError) as e:
            why = str(e) or type(e).__name__
        return 200, mine + (
            f"# the agent's metrics are unavailable: {why}\n"
            "# HELP dabba_agent_up Whether the tunnel could read the agent's metrics\n"
            "# TYPE dabba_agent_up gauge\ndabba_agent_up 0.0\n"
        )

    def _agent_sock(self) -> str:
        return os.path.join(self.cfg.state_dir, "agent.sock")

    @admin.with_query
    async def flows(self, query: dict) -> tuple[int, object]:
        """The agent's flow table (the kernel's records joined with this tunnel's facts)."""
        target = "/flows" + ("?" + urllib.parse.urlencode(query) if query else "")
        try:
            status, body = await admin.get_unix(self._agent_sock(), target)
        except (OSError, TimeoutError) as e:
            return 503, {"error": f"the agent is not answering on {self._agent_sock()}: {e}"}
        return status, json.loads(body)

    def _check_recognised(self) -> None:
        was, self._recognised = self._recognised, os.path.exists(self._tun_ops)
        if was != self._recognised:
            (_log.info if self._recognised else _log.error)(
                "connections to this node's workloads "
                + ("are recognised again" if self._recognised else "are not recognised: refused"),
                fields={"tunops": self._tun_ops},
            )

    def ready(self) -> tuple[int, str]:
        ok = (
            self._listening
            and self.state.version > 0
            and bool(self.identities and self.identities.contexts)
        )
        return (200, "ready\n") if ok else (503, "not ready\n")

    def config_dump(self) -> tuple[int, dict]:
        """What the tunnel holds, without secrets (no key material, no key paths)."""
        certs = []
        for w in self.state.by_cgroup.values():
            chain = os.path.join(self.cfg.state_dir, "certs", w.namespace, w.name, "chain.pem")
            try:
                with open(chain, "rb") as f:
                    leaf = certread.load_pem_first(f.read())
                certs.append(
                    {
                        "identity": w.spiffe_id,
                        "serial": format(leaf.serial, "x"),
                        "not_after": leaf.not_after.isoformat(),
                        "issuer": leaf.issuer,
                    }
                )
            except (OSError, ValueError):
                certs.append({"identity": w.spiffe_id, "error": "no certificate"})
        return 200, {
            "node": self.cfg.node,
            "version": self.state.version,
            "trust_domain": self.state.trust_domain,
            "roots": [r.fingerprint for r in certread.load_pem(self.state.bundle)]
            if self.state.bundle
            else [],
            "listeners": {
                "outbound": self.cfg.outbound,
                "inbound": self.cfg.inbound,
                "readiness": [self.cfg.inbound[0], self.cfg.readiness_port],
                "admin": self.cfg.admin,
            },
            # outlier ejection of the VIPs this tunnel resolves (the kernel's: dabba services)
            "lb": dataclasses.asdict(self.lb.cfg),
            "local_workloads": [
                {
                    "name": w.name,
                    "namespace": w.namespace,
                    "identity": w.spiffe_id,
                    "ip": w.ip,
                    "mtls_mode": w.mtls_mode,
                    "port_mtls": {str(p): v for p, v in sorted(w.port_mtls.items())},
                }
                for w in self.state.by_cgroup.values()
            ],
            "workloads": len(self.state.by_ip),
            "services": [
                {
                    "name": s.name,
                    "namespace": s.namespace,
                    "vip": s.vip,
                    "endpoints": list(s.endpoints),
                    "lb_policy": s.lb_policy,
                    "waypoint": s.waypoint,
                    "waypoint_pods": list(s.waypoint_pods),
                    "waypoint_refusal": s.waypoint_refusal,
                }
                for s in self.state.services.values()
            ],
            "nodes": self.state.nodes,
            "policies": [
                {"name": p.key, "action": p.action, "rules": len(p.rules), "origin": p.origin}
                for p in self.state.policies
            ],
            "certificates": certs,
        }

    def connections(self) -> tuple[int, dict]:
        pools = []
        if self.pool:
            for (src, dst, node), c in self.pool.conns.items():
                if c.transport and not c.transport.is_closing():
                    pools.append(
                        {"source": src, "destination": dst, "node": node, "streams": len(c.streams)}
                    )

        def describe(c):
            out = []
            for sid, st in list(c.streams.items())[:50]:
                out.append(
                    {
                        "id": sid,
                        "authority": st.authority,
                        "h2_state": c.h2.state(sid),
                        "tcp_eof": st.tcp.eof if st.tcp else None,
                        "tcp_lost": st.tcp.lost if st.tcp else None,
                        "end_pending": st.end_pending,
                        "outbuf": len(st.outbuf),
                        "in": st.bytes_in,
                        "out": st.bytes_out,
                    }
                )
            return out

        open_streams = []
        if self.pool:
            for c in self.pool.conns.values():
                open_streams += describe(c)
        if self.listener is not None:
            for c in list(self.listener.conns):
                open_streams += describe(c)
        return 200, {
            "open_streams": open_streams[:100],
            "hbone_connections": pools,
            "hbone_handshakes": self.pool.handshakes if self.pool else 0,
            "splice_pairs": self.splicer.active,
        }

    def stats_doc(self) -> tuple[int, dict]:
        """Counters of every worker summed (each worker's own under "workers")."""
        totals = Counter(self.stats)
        per = [{"worker": 0, "pid": os.getpid(), **self.stats}]
        refused = Counter(self.listener.refused if self.listener else {})
        pairs = self.splicer.active
        for r in self.workers.reports():
            totals.update(r["stats"])
            refused.update(r["refused"])
            pairs += r["splice_pairs"]
            per.append({"worker": r["worker"], "pid": r["pid"], **r["stats"]})
        doc = {**totals, "lb": self.lb.snapshot(), "enforced_flows": len(self.enforced)}
        doc["workers"] = per
        if self.listener is not None:
            doc["hbone_refused"] = dict(refused)
            doc["hbone_accepted"] = self.listener.accepted
            doc["hbone_handshaking"] = self.listener.handshaking
        doc["splice_pairs"] = pairs
        # facts kept for a new agent line: of open flows, and of flows closed moments ago
        doc["facts_kept"] = len(self.facts.kept)
        doc["facts_recent"] = len(self.facts.recent)
        doc["relayed_sides"] = hbone.TcpSide.open + sum(
            r.get("relayed_sides", 0) for r in self.workers.reports()
        )
        return 200, doc
