"""The agent's flow table: the kernel's per-flow records joined with the tunnel's facts.

The kernel accounts each flow on the enrolled workload's own socket, so
spliced, proxied (HBONE) and passthrough flows are counted the same way.
The tunnel sends what it knows of each workload socket it handled (peer
identity, service, path, security, verdict; see agent/ztunnel/facts.py),
keyed by the socket's addresses. A record without facts is either not
captured (``passthrough``, plaintext) or still waiting for them
(``pending``).

Byte counters follow Istio's meaning whichever side reports:
``istio_tcp_received_bytes_total`` counts bytes from the source to the
destination (the request), ``istio_tcp_sent_bytes_total`` bytes back (the
response).
"""

from __future__ import annotations

import bisect
import collections
import itertools
import threading
import time
from collections.abc import Callable
from typing import NamedTuple

from ..bpf import abi
from ..bpf.flows import FlowRecord
from ..control.model import waypoint_refusal
from ..errors import DabbaError
from ..ztunnel.facts import key_of
from ..ztunnel.metrics import ISTIO_LABELS, istio_labels
from .closedring import ClosedRing

PATHS = ("hbone", "splice", "direct", "passthrough", "denied", "failed", "pending")
VERDICTS = ("allow", "deny")
SORTS = ("bytes", "duration", "rtt", "start")
STATES = ("all", "live", "closed")
RTT_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0)
MAX_FACTS = 1 << 18
_NO_ENDPOINT = abi.REFUSAL_REASONS[abi.Refusal.NO_ENDPOINT]
FACTS_WAIT = 1.0  # how long a closed record waits for the tunnel's facts before it is final


def parse_duration(text: str, what: str) -> float:
    """'30s', '5m', '2h', '1d' or plain seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    t = text.strip()
    try:
        v = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
    except ValueError:
        raise DabbaError(
            f"{what}: {text!r} is not a duration", hint="use a number with s, m, h or d: 30s, 5m"
        ) from None
    if v < 0:
        raise DabbaError(f"{what}: {text!r} is negative")
    return v


def parse_filters(q: dict[str, str]) -> dict:
    """Validate /flows query parameters (the CLI's flags); raises DabbaError naming the bad one."""
    out: dict = {}
    for k in q:
        if k not in (
            "workload",
            "namespace",
            "service",
            "verdict",
            "path",
            "since",
            "port",
            "sort",
            "state",
            "limit",
        ):
            raise DabbaError(f"unknown flow filter {k!r}")
    for k in ("workload", "namespace", "service"):
        if q.get(k):
            out[k] = q[k]
    for k, allowed in (("verdict", VERDICTS), ("path", PATHS), ("sort", SORTS), ("state", STATES)):
        v = q.get(k)
        if v:
            if v not in allowed:
                raise DabbaError(f"--{k} {v!r} is not one of: {', '.join(allowed)}")
            out[k] = v
    if q.get("since"):
        out["since"] = parse_duration(q["since"], "--since")
    for k, lo, hi in (("port", 1, 65535), ("limit", 1, 10**7)):
        if q.get(k):
            try:
                v = int(q[k])
            except ValueError:
                raise DabbaError(f"--{k} {q[k]!r} is not a number") from None
            if not lo <= v <= hi:
                raise DabbaError(f"--{k} {v} is out of range ({lo}..{hi})")
            out[k] = v
    return out


def _matches_workload(pattern: str, *parties: dict) -> bool:
    for p in parties:
        w = p.get("workload") or ""
        if w and (w == pattern or w.split("/", 1)[-1] == pattern):
            return True
    return False


def select(views: list[dict], f: dict, now: float | None = None) -> list[dict]:
    """Filter and sort flow views by parsed filters (parse_filters)."""
    now = now or time.time()
    out = []
    for v in views:
        if "workload" in f and not _matches_workload(f["workload"], v["src"], v["dst"]):
            continue
        if "namespace" in f and f["namespace"] not in (
            v["src"]["namespace"],
            v["dst"]["namespace"],
        ):
            continue
        if "service" in f and f["service"] not in (v["service"], v["service"].split("/")[-1]):
            continue
        if "verdict" in f and v["verdict"] != f["verdict"]:
            continue
        if "path" in f and v["path"] != f["path"]:
            continue
        if "port" in f and v["dst"]["port"] != f["port"]:
            continue
        if "since" in f and v["end"] is not None and v["end"] < now - f["since"]:
            continue
        st = f.get("state", "all")
        if st != "all" and (st == "live") != (v["end"] is None):
            continue
        out.append(v)
    key = {
        "bytes": lambda v: v["bytes_sent"] + v["bytes_received"],
        "duration": lambda v: v["duration"],
        "rtt": lambda v: v["srtt_us"],
        "start": lambda v: v["start"],
    }[f.get("sort", "start")]
    out.sort(key=key, reverse=f.get("sort", "start") != "start")
    if "limit" in f:
        out = out[-f["limit"] :] if f.get("sort", "start") == "start" else out[: f["limit"]]
    return out


def summarize(views: list[dict]) -> list[dict]:
    """One row per (source workload, destination workload, path)."""
    rows: dict[tuple, dict] = {}
    for v in views:
        k = (
            v["src"]["workload"] or v["src"]["ip"],
            v["dst"]["workload"] or v["dst"]["ip"],
            v["path"],
        )
        r = rows.setdefault(
            k,
            {
                "src": k[0],
                "dst": k[1],
                "path": k[2],
                "flows": 0,
                "open": 0,
                "denied": 0,
                "bytes_to_dst": 0,
                "bytes_to_src": 0,
                "retrans": 0,
                "_rtt": [],
            },
        )
        r["flows"] += 1
        r["open"] += v["end"] is None
        r["denied"] += v["verdict"] == "deny"
        up, down = v["bytes_to_dst"], v["bytes_to_src"]
        r["bytes_to_dst"] += up
        r["bytes_to_src"] += down
        r["retrans"] += v["retrans"]
        if v["srtt_us"]:
            r["_rtt"].append(v["srtt_us"])
    out = []
    for r in rows.values():
        rtts = sorted(r.pop("_rtt"))
        r["median_srtt_us"] = rtts[len(rtts) // 2] if rtts else None
        out.append(r)
    out.sort(key=lambda r: r["bytes_to_dst"] + r["bytes_to_src"], reverse=True)
    return out


class Shape(NamedTuple):
    """What the flows of one kind share: who is at each end, the path, the verdict, the
    metric labels. Shapes are cached by the record's fields they depend on, or by the
    tunnel's facts without the peer's port, so a closed flow costs a lookup, not a view, and
    holds its record only; its view is made when someone asks (render). A shape keeps the
    workloads of its time: a flow of a pod since deleted still names it."""

    me: dict  # the enrolled workload's end, without its address
    peer: dict  # the other end; all but its port when peer_from is "fact"
    peer_from: str  # "fact" | "dst" | "orig_dst": where the peer's address comes from
    path: str
    security: str
    verdict: str
    reason: str
    policy: str
    service: str
    labels: tuple | None  # Istio labels, None where nothing is counted (denied, pending)
    dkey: tuple  # (destination workload, namespace) for retransmits and RTT


class FlowTable:
    """Live and recently closed flows of one node, and the byte counters derived from them.

    describe(cgroup_id) -> (workload pb or None), by_ip(ip) -> workload pb or None and
    tunnel_addrs() -> set of the tunnel's IPs come from the agent's current snapshot; the
    agent calls invalidate() whenever they change.
    """

    MAX_SHAPES = 1 << 16

    def __init__(
        self,
        keep_closed: int,
        describe: Callable[[int], object],
        by_ip: Callable[[str], object],
        tunnel_addrs: Callable[[], set],
        decision: Callable[[int], object] = lambda _rule: None,
        service_of: Callable[[str], object] = lambda _ip: None,
    ):
        self.decision = decision  # a same-node verdict's Decision, by the rule in the record
        self.service_of = service_of  # a Service by its VIP (direct flows the kernel resolved)
        self.lock = threading.Lock()
        self.describe, self.by_ip, self.tunnel_addrs = describe, by_ip, tunnel_addrs
        self.facts: collections.OrderedDict[str, dict] = collections.OrderedDict()
        # closed flows, decoded and rendered when asked (with their shape and the peer's port
        # from the facts)
        self.closed = ClosedRing(keep_closed)
        # closed records waiting for facts: (since, record, its bytes, their wall offset)
        self.pending: collections.deque[tuple[float, FlowRecord, bytes, float]] = (
            collections.deque()
        )
        self.shapes: dict[tuple, Shape] = {}
        self.seen: dict[int, tuple] = {}  # cookie -> (bytes to dst, bytes to src, retrans) counted
        self.sent: collections.Counter = collections.Counter()  # istio labels -> response bytes
        self.received: collections.Counter = collections.Counter()  # -> request bytes
        self.retrans: collections.Counter = collections.Counter()  # (dst wl, dst ns) -> segments
        # connections of flows no tunnel carried (direct): the tunnel counts its own
        self.conns_opened: collections.Counter = collections.Counter()  # istio labels -> count
        self.conns_closed: collections.Counter = collections.Counter()
        self.counted_open: set[int] = set()  # cookies of direct flows counted as opened
        self.rtt: dict[tuple, list] = {}  # (dst wl, dst ns) -> [bucket counts..., sum, count]
        self.denied = 0
        self.facts_received = 0
        self.closed_total = 0

    # ---- input -----------------------------------------------------------------------------
    def add_fact(self, doc: dict) -> None:
        with self.lock:
            self.facts[doc["key"]] = doc
            self.facts.move_to_end(doc["key"])
            self.facts_received += 1
            while len(self.facts) > MAX_FACTS:
                self.facts.popitem(last=False)

    def on_closed(self, *recs: FlowRecord, raws: list[bytes] | None = None, wall: float = 0.0):
        """Closed records, with the kernel's bytes of each and their wall offset (made from
        recs when not given: records built in Python)."""
        t = time.monotonic()
        if raws is None:
            raws, wall = [r.to_raw() for r in recs], 0.0
        with self.lock:
            self.pending.extend(zip(itertools.repeat(t), recs, raws, itertools.repeat(wall)))

    def invalidate(self) -> None:
        """The snapshot changed (workloads, services, verdicts, the tunnel's addresses): shapes
        are made again from it. Shapes already given to closed flows stay theirs."""
        with self.lock:
            self.shapes = {}

    def tick(self) -> None:
        """Finalize closed records whose facts arrived (or that waited long enough)."""
        now = time.monotonic()
        with self.lock:
            keep = collections.deque()
            facts, closed = self.facts, self.closed
            tunnel = None
            for t, rec, raw, wall in self.pending:
                fact = None
                if rec.captured or not rec.direct:  # a direct flow has no tunnel to tell of it
                    key = key_of(rec.src, rec.dst)
                    fact = facts.pop(key, None)
                    if fact is None and now - t < FACTS_WAIT:
                        # the tunnel tells of the flows it carried: captured ones, and those it
                        # delivered to a workload here (from its address)
                        if not rec.captured and tunnel is None:
                            tunnel = self.tunnel_addrs()
                        if rec.captured or (rec.direction == "inbound" and rec.dst[0] in tunnel):
                            keep.append((t, rec, raw, wall))
                            continue
                sh = self._shape(rec, fact)
                self._account(rec, sh, final=True)
                closed.append(raw, wall, sh, _peer_port(rec, fact))
                self.closed_total += 1
                if sh.verdict == "deny" and not rec.refused:  # policy denials
                    self.denied += 1
            self.pending = keep

    # ---- views -----------------------------------------------------------------------------
    def live(self, records: list[FlowRecord]) -> list[dict]:
        """Views of the kernel's live records; counts their bytes so far."""
        out = []
        with self.lock:
            for rec in records:
                fact = self.facts.get(key_of(rec.src, rec.dst))
                sh = self._shape(rec, fact)
                self._account(rec, sh, final=False)
                out.append(render(rec, sh, _peer_port(rec, fact)))
        return out

    def recent(self) -> list[dict]:
        with self.lock:
            return [render(*entry) for entry in self.closed]

    @staticmethod
    def _party_of(w, ip: str = "", port: int | None = None, identity: str | None = None) -> dict:
        return {
            "ip": ip,
            "port": port,
            "workload": f"{w.namespace}/{w.name}" if w is not None else "",
            "identity": identity if identity is not None else (w.spiffe_id if w else ""),
        }

    def _shape(self, rec: FlowRecord, fact: dict | None) -> Shape:
        out = rec.direction == "outbound"
        if fact is not None:
            # the tunnel's word on this socket. Flows of one kind share their shape, without
            # the peer's port (the view takes it from the fact: _peer_port): before, each kept
            # closed flow held its own shape and its fact's dicts, 3.8 KB a flow, and 10,000
            # kept cross-node flows grew the agent by 38 MiB
            src, dst = fact["src"], fact["dst"]
            me, peer = (src, dst) if out else (dst, src)
            labels = tuple(fact["labels"]) if fact.get("labels") else None
            key = (
                "fact", rec.direction, rec.cgroup_id, me["workload"], me["identity"],
                peer["ip"], peer["workload"], peer["identity"], fact["path"], fact["security"],
                fact["verdict"], fact["reason"], fact.get("policy", ""), fact.get("service", ""),
                labels, (peer.get("original") or {}).get("ip", ""),  # a waypoint's source
            )  # fmt: skip
            sh = self.shapes.get(key)
            if sh is None:
                if len(self.shapes) >= self.MAX_SHAPES:
                    self.shapes = {}
                sh = self.shapes[key] = self._make(
                    rec,
                    {**me, "ip": "", "port": None},  # the view takes them from the record
                    {**peer, "port": None},
                    "fact",
                    fact["path"],
                    fact["security"],
                    fact["verdict"],
                    fact["reason"],
                    fact.get("policy", ""),
                    fact.get("service", ""),
                    labels,
                )
            return sh
        if rec.refused:
            key = ("refused", rec.cgroup_id, rec.orig_dst[0], rec.rule, rec.refused)
        elif rec.direct:
            vip = rec.orig_dst[0] if out and rec.orig_dst != rec.dst else ""
            key = ("direct", rec.direction, rec.cgroup_id, rec.dst[0], rec.rule, vip)
        else:
            peer_ip = rec.orig_dst[0] if out else rec.dst[0]
            key = ("other", rec.direction, rec.cgroup_id, peer_ip, rec.captured)
        sh = self.shapes.get(key)
        if sh is None:
            if len(self.shapes) >= self.MAX_SHAPES:
                self.shapes = {}
            sh = self.shapes[key] = self._new_shape(rec, out)
        return sh

    def _new_shape(self, rec: FlowRecord, out: bool) -> Shape:
        me = self._party_of(self.describe(rec.cgroup_id))
        if rec.refused:  # connect() refused in the kernel: nothing was sent
            peer_ip = rec.orig_dst[0]
            reason, policy = f"refused in the kernel: {rec.refused}", ""
            d = self.decision(rec.rule) if rec.rule else None
            if d is not None:  # a same-node verdict: which policy, which rule
                reason, policy = f"refused in the kernel: {d.reason}", d.policy or ""
            elif rec.refused == _NO_ENDPOINT and getattr(
                svc := self.service_of(peer_ip), "waypoint", ""
            ):
                # sent without endpoints because it opted into a waypoint: say so
                reason = "refused in the kernel: " + waypoint_refusal(
                    f"{svc.namespace}/{svc.name}", svc.waypoint, svc.waypoint_refusal
                )
            peer = self._party_of(self.by_ip(peer_ip))
            return self._make(rec, me, peer, "orig_dst", "denied", "none", "deny", reason, policy)
        if rec.direct:  # same node, straight through the kernel's TCP: no tunnel
            peer = self._party_of(self.by_ip(rec.dst[0]))
            d = self.decision(rec.rule)
            reason = d.reason if d is not None else "allowed by a same-node verdict"
            policy = (d.policy or "") if d is not None else ""
            svc = self.service_of(rec.orig_dst[0]) if out and rec.orig_dst != rec.dst else None
            service = f"{svc.namespace}/{svc.name}" if svc is not None else ""
            return self._make(
                rec, me, peer, "dst", "direct", "node_local", "allow", reason, policy, service
            )
        peer_ip = rec.orig_dst[0] if out else rec.dst[0]
        peer = self._party_of(self.by_ip(peer_ip))
        via_tunnel = rec.captured or (not out and peer_ip in self.tunnel_addrs())
        reason = (
            "the tunnel's facts did not arrive"
            if via_tunnel
            else ("not captured: excluded or capture off" if out else "not through the tunnel")
        )
        return self._make(
            rec,
            me,
            peer,
            "orig_dst" if out else "dst",
            "pending" if via_tunnel else "passthrough",
            "unknown" if via_tunnel else "plaintext",
            "allow",
            reason,
        )

    def _make(
        self, rec, me, peer, peer_from, path, security, verdict, reason, policy="", service="",
        labels=None,
    ) -> Shape:  # fmt: skip
        out = rec.direction == "outbound"
        me = {**me, "namespace": me["workload"].split("/", 1)[0] if me["workload"] else ""}
        peer = {**peer, "namespace": peer["workload"].split("/", 1)[0] if peer["workload"] else ""}
        dst = peer if out else me
        if labels is None and verdict != "deny" and path != "pending":
            if peer_from == "fact":
                peer_ip = peer["ip"]
            else:
                peer_ip = (rec.orig_dst if peer_from == "orig_dst" else rec.dst)[0]
            me_w, peer_w = self.describe(rec.cgroup_id), self.by_ip(peer_ip)
            labels = istio_labels(
                "source" if out else "destination",
                me_w if out else peer_w,
                peer_w if out else me_w,
                self.service_of(rec.orig_dst[0]) if service else None,
                "node_local" if path == "direct" else "none",
            )
        dkey = (dst["workload"].split("/")[-1] or "unknown", dst["namespace"] or "unknown")
        return Shape(
            me, peer, peer_from, path, security, verdict, reason, policy, service, labels, dkey
        )

    # ---- metrics ---------------------------------------------------------------------------
    def _account(self, rec: FlowRecord, sh: Shape, final: bool) -> None:
        out = rec.direction == "outbound"
        to_dst, to_src = (
            (rec.bytes_sent, rec.bytes_received) if out else (rec.bytes_received, rec.bytes_sent)
        )
        if final:
            before = self.seen.pop(rec.cookie, None)
        else:
            before = self.seen.get(rec.cookie)
            self.seen[rec.cookie] = (to_dst, to_src, rec.retrans)
        if before is not None:
            d_up, d_down, d_re = (
                max(to_dst - before[0], 0),
                max(to_src - before[1], 0),
                max(rec.retrans - before[2], 0),
            )
        else:
            d_up, d_down, d_re = to_dst, to_src, rec.retrans
        labels = sh.labels
        if labels is not None:
            if sh.path == "direct":
                counted = rec.cookie in self.counted_open
                if not counted:
                    self.conns_opened[labels] += 1
                    if not final:
                        self.counted_open.add(rec.cookie)
                elif final:
                    self.counted_open.discard(rec.cookie)
                if final:
                    self.conns_closed[labels] += 1
            if d_up:
                self.received[labels] += d_up
            if d_down:
                self.sent[labels] += d_down
        if d_re:
            self.retrans[sh.dkey] += d_re
        if final and rec.srtt_us:
            # one slot per bucket, the overflow slot, then the sum and the count
            h = self.rtt.get(sh.dkey)
            if h is None:
                h = self.rtt[sh.dkey] = [0] * (len(RTT_BUCKETS) + 1) + [0.0, 0]
            s = rec.srtt_us / 1e6
            h[bisect.bisect_left(RTT_BUCKETS, s)] += 1
            h[-2] += s
            h[-1] += 1

    def collect(self):
        """Metric families for the agent's registry."""
        from ..prom import CounterMetricFamily, HistogramMetricFamily

        with self.lock:
            sent, received = dict(self.sent), dict(self.received)
            opened, closed = dict(self.conns_opened), dict(self.conns_closed)
            retrans, rtt = dict(self.retrans), {k: list(h) for k, h in self.rtt.items()}
        for name, data, doc in (
            ("istio_tcp_sent_bytes", sent, "Bytes sent during response (destination to source)"),
            (
                "istio_tcp_received_bytes",
                received,
                "Bytes received during request (source to destination)",
            ),
        ):
            m = CounterMetricFamily(
                name, doc + ", from the kernel's flow records", labels=ISTIO_LABELS
            )
            for k, v in data.items():
                m.add_metric(k, v)
            yield m
        for name, data, doc in (
            ("istio_tcp_connections_opened", opened, "TCP connections opened"),
            ("istio_tcp_connections_closed", closed, "TCP connections closed"),
        ):
            m = CounterMetricFamily(
                name,
                doc + ", of flows no tunnel carried (same node, direct; the tunnel counts its own)",
                labels=ISTIO_LABELS,
            )
            for k, v in data.items():
                m.add_metric(k, v)
            yield m
        dl = ["destination_workload", "destination_workload_namespace"]
        m = CounterMetricFamily("dabba_flow_retransmits", "TCP segments retransmitted", labels=dl)
        for k, v in retrans.items():
            m.add_metric(k, v)
        yield m
        h = HistogramMetricFamily(
            "dabba_flow_rtt_seconds", "Smoothed RTT of closed flows (kernel srtt)", labels=dl
        )
        for k, counts in rtt.items():
            acc, buckets = 0, []
            for i, b in enumerate(RTT_BUCKETS):
                acc += counts[i]
                buckets.append((str(b), acc))
            acc += counts[len(RTT_BUCKETS)]
            buckets.append(("+Inf", acc))
            h.add_metric(list(k), buckets, counts[-2])
        yield h


def _peer_port(rec: FlowRecord, fact: dict | None) -> int | None:
    """The other end's port, as the tunnel's facts say (None without them)."""
    if fact is None:
        return None
    return fact["dst" if rec.direction == "outbound" else "src"]["port"]


def render(rec: FlowRecord, sh: Shape, peer_port: int | None = None) -> dict:
    """The view of one flow (what `dabba flows` shows): its record in its shape; peer_port:
    the other end's port when the shape comes from the tunnel's facts."""
    out = rec.direction == "outbound"
    me = {**sh.me, "ip": rec.src[0], "port": rec.src[1]}
    if sh.peer_from == "fact":
        peer = {**sh.peer, "port": peer_port}
    else:
        ip, port = rec.orig_dst if sh.peer_from == "orig_dst" else rec.dst
        peer = {**sh.peer, "ip": ip, "port": port}
    src, dst = (me, peer) if out else (peer, me)
    to_dst, to_src = (
        (rec.bytes_sent, rec.bytes_received) if out else (rec.bytes_received, rec.bytes_sent)
    )
    return {
        "id": rec.cookie,
        "direction": rec.direction,
        "reporter": "source" if out else "destination",
        "src": src,
        "dst": dst,
        "service": sh.service,
        "path": sh.path,
        "security": sh.security,
        "verdict": sh.verdict,
        "reason": sh.reason,
        "policy": sh.policy,
        "bytes_sent": rec.bytes_sent,
        "bytes_received": rec.bytes_received,
        "bytes_to_dst": to_dst,
        "bytes_to_src": to_src,
        "segs_out": rec.segs_out,
        "segs_in": rec.segs_in,
        "retrans": rec.retrans,
        "srtt_us": rec.srtt_us,
        "start": rec.start,
        "end": rec.end,
        "duration": rec.duration,
        "close": rec.close,
        "state": rec.state,
    }
