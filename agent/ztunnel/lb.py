"""Service load balancing: pick an endpoint, retry another on connect failure, eject failing ones.

Per service (its VIP), chosen by the Service's ``lbPolicy``:
- ``round_robin`` (default): endpoints in turn;
- ``least_connections``: the endpoint with the fewest open flows from this
  node (ties in turn, so equal load still spreads);
- ``random``: uniformly at random.

Outlier ejection, like Envoy's for connect failures: after ``eject_after``
consecutive connect failures an endpoint is ejected for ``eject_time``
seconds, doubled on each further ejection (capped at 10x), and reset by a
success; never more than ``max_ejected`` of a service's endpoints are out at
once (if all endpoints fail, some are still tried). A failure is only a
failed connect: nothing was forwarded, so the tunnel retries another endpoint
(up to ``retries`` times) and the client never sees it.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass, field

from .. import log

_log = log.get("lb")

POLICIES = ("round_robin", "least_connections", "random")


@dataclass
class LbConfig:
    eject_after: int = 3  # consecutive connect failures
    eject_time: float = 30.0  # base ejection, seconds
    max_ejected: float = 0.5  # share of a service's endpoints
    retries: int = 2  # other endpoints tried after a failed connect


@dataclass
class _Health:
    failures: int = 0  # consecutive
    ejections: int = 0
    ejected_until: float = 0.0


@dataclass
class Balancer:
    cfg: LbConfig = field(default_factory=LbConfig)
    rr: Counter = field(default_factory=Counter)  # per service
    active: Counter = field(default_factory=Counter)  # open flows per endpoint key
    health: dict[str, _Health] = field(default_factory=dict)  # per endpoint key
    stats: Counter = field(default_factory=Counter)
    clock = staticmethod(time.monotonic)

    def ejected(self, ep: str) -> bool:
        h = self.health.get(ep)
        return h is not None and h.ejected_until > self.clock()

    def pick(self, service: str, policy: str, endpoints: list[str], exclude=()) -> str | None:
        """An endpoint of service not in exclude, honouring ejection; None when none is left."""
        cands = [e for e in endpoints if e not in exclude]
        if not cands:
            return None
        healthy = [e for e in cands if not self.ejected(e)]
        cands = healthy or cands  # all ejected: try them anyway rather than fail
        if policy == "random":
            return random.choice(cands)
        i = self.rr[service]
        self.rr[service] += 1
        if policy == "least_connections":
            low = min(self.active[e] for e in cands)
            cands = [e for e in cands if self.active[e] == low]
        return cands[i % len(cands)]

    def opened(self, ep: str) -> None:
        self.active[ep] += 1
        h = self.health.get(ep)
        if h is not None:
            h.failures = 0
            h.ejections = 0 if h.ejected_until <= self.clock() else h.ejections

    def closed(self, ep: str) -> None:
        self.active[ep] -= 1
        if self.active[ep] <= 0:
            del self.active[ep]

    def failed(self, service: str, ep: str, endpoints: list[str]) -> None:
        """A connect to ep failed; eject it once it failed eject_after times in a row."""
        h = self.health.setdefault(ep, _Health())
        h.failures += 1
        self.stats["connect_failures"] += 1
        if h.failures < self.cfg.eject_after or self.ejected(ep):
            return
        out = sum(1 for e in endpoints if e != ep and self.ejected(e))
        if (out + 1) > self.cfg.max_ejected * len(endpoints):
            _log.warning(
                "endpoint keeps failing but the service is at its ejection limit",
                fields={"service": service, "endpoint": ep, "ejected": out},
            )
            return
        secs = self.cfg.eject_time * min(2**h.ejections, 10)
        h.ejections += 1
        h.ejected_until = self.clock() + secs
        h.failures = 0
        self.stats["ejections"] += 1
        _log.warning(
            "endpoint ejected after consecutive connect failures",
            fields={"service": service, "endpoint": ep, "seconds": secs},
        )

    def snapshot(self) -> dict:
        now = self.clock()
        return {
            "active": dict(self.active),
            "ejected": {
                e: round(h.ejected_until - now, 1)
                for e, h in self.health.items()
                if h.ejected_until > now
            },
            **self.stats,
        }
