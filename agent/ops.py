"""The operator's commands (`dabba flows`, `status`, `workloads`, ...): read the agent, print.

Everything here is a client of the agent's API (agent/node/api.py); the
data is computed there, so scripts reading the API see the same.
"""

from __future__ import annotations

import datetime
import json
import sys
import time

import click
from rich.console import Console
from rich.table import Table

from .node import flowtable
from .node.client import AgentClient, resolve_state_dir


def client(state_dir: str | None, node: str | None) -> AgentClient:
    return AgentClient(resolve_state_dir(state_dir, node))


def _console() -> Console:
    # a terminal gets tables that fit it; a pipe gets whole rows (no wrapping, no cutting)
    return Console(highlight=False, width=None if sys.stdout.isatty() else 400)


SECURITY = {"mutual_tls": "mTLS", "node_local": "node", "plaintext": "plain"}


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def human_s(s: float | None) -> str:
    if s is None:
        return "-"
    if s < 1:
        return f"{s * 1000:.0f}ms"
    if s < 120:
        return f"{s:.1f}s"
    if s < 7200:
        return f"{s / 60:.0f}m"
    if s < 172800:
        return f"{s / 3600:.1f}h"
    return f"{s / 86400:.1f}d"


def _end(p: dict) -> str:
    name = p["workload"] or p["ip"]
    return f"{name}:{p['port']}" if p.get("port") else name


# ---- flows --------------------------------------------------------------------------------------


def _flow_table(flows: list[dict], now: float) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for col, kw in (
        ("AGE", {"justify": "right"}),
        ("AT", {"no_wrap": True}),
        ("SOURCE", {"overflow": "fold", "ratio": 3}),
        ("DESTINATION", {"overflow": "fold", "ratio": 3}),
        ("SERVICE", {"overflow": "fold", "ratio": 1}),
        ("PATH", {"no_wrap": True}),
        ("SEC", {"no_wrap": True}),
        ("VERDICT", {"no_wrap": True}),
        ("→DST", {"justify": "right", "no_wrap": True}),
        ("←SRC", {"justify": "right", "no_wrap": True}),
        ("RTT", {"justify": "right", "no_wrap": True}),
        ("DUR", {"justify": "right", "no_wrap": True}),
        ("STATE", {"no_wrap": True}),
    ):
        t.add_column(col, **kw)
    for f in flows:
        verdict = f["verdict"] if f["verdict"] == "allow" else f"[red]{f['verdict']}[/red]"
        t.add_row(
            human_s(now - f["start"]),
            "src" if f["reporter"] == "source" else "dst",
            _end(f["src"]),
            _end(f["dst"]),
            f["service"] or "-",
            f["path"],
            SECURITY.get(f["security"], f["security"]),
            verdict,
            human_bytes(f["bytes_to_dst"]),
            human_bytes(f["bytes_to_src"]),
            f"{f['srtt_us'] / 1000:.2f}ms" if f["srtt_us"] else "-",
            human_s(f["duration"]),
            "open" if f["end"] is None else f["close"],
        )
    return t


def flows(c: AgentClient, query: dict, output: str, summary: bool, follow: bool) -> None:
    flowtable.parse_filters(query)  # a malformed filter fails here, before asking the agent
    if follow:
        return _follow(c, query, output)
    if summary:
        doc = c.get("/flows/summary", query)
        if output != "table":
            _dump(doc if output == "json" else doc["pairs"], output)
            return
        t = Table(box=None, pad_edge=False, header_style="bold")
        for col in ("SOURCE", "DESTINATION", "PATH", "FLOWS", "OPEN", "DENIED", "→DST", "←SRC"):
            t.add_column(col, justify="right" if col in ("FLOWS", "OPEN", "DENIED") else "left")
        t.add_column("RETRANS", justify="right")
        t.add_column("MEDIAN RTT", justify="right")
        for r in doc["pairs"]:
            t.add_row(
                r["src"],
                r["dst"],
                r["path"],
                str(r["flows"]),
                str(r["open"]),
                str(r["denied"]),
                human_bytes(r["bytes_to_dst"]),
                human_bytes(r["bytes_to_src"]),
                str(r["retrans"]),
                f"{r['median_srtt_us'] / 1000:.2f}ms" if r["median_srtt_us"] else "-",
            )
        _console().print(t)
        return
    doc = c.get("/flows", query)
    if output == "json":
        _dump(doc, "json")
    elif output == "jsonl":
        for f in doc["flows"]:
            click.echo(json.dumps(f))
    else:
        con = _console()
        con.print(_flow_table(doc["flows"], doc["now"]))
        live = sum(1 for f in doc["flows"] if f["end"] is None)
        con.print(
            f"\n{len(doc['flows'])} flows on node {doc['node']} ({live} open). "
            "AT: the end whose socket the kernel counted. "
            "→DST: bytes from source to destination, ←SRC: back. "
            "Filters: --workload --namespace --service --verdict --path --port --since; "
            "--summary per workload pair; -o json for everything."
        )


def _follow(c: AgentClient, query: dict, output: str) -> None:
    """Print flows as they open and close (polls the agent every 0.5 s) until interrupted."""
    opened: set[int] = set()
    closed: set[int] = set()
    q = dict(query)
    first = True
    try:
        while True:
            doc = c.get("/flows", q)
            for f in sorted(doc["flows"], key=lambda f: f["start"]):
                ev = None
                if f["end"] is None and f["id"] not in opened:
                    opened.add(f["id"])
                    ev = "open"
                elif f["end"] is not None and f["id"] not in closed:
                    closed.add(f["id"])
                    ev = "close"
                if ev is None or (first and ev == "close"):
                    continue  # flows that closed before we started are history, not events
                if output == "table":
                    stamp = datetime.datetime.fromtimestamp(
                        f["end"] if ev == "close" else f["start"]
                    ).strftime("%H:%M:%S.%f")[:-3]
                    extra = (
                        f" →{f['bytes_to_dst']}B ←{f['bytes_to_src']}B {f['close']}"
                        if ev == "close"
                        else ""
                    )
                    click.echo(
                        f"{stamp} {ev.upper():<5} {_end(f['src'])} -> {_end(f['dst'])} "
                        f"{f['path']} {f['security']} {f['verdict']}"
                        + (f" ({f['reason']})" if f["verdict"] == "deny" else "")
                        + extra
                    )
                else:
                    click.echo(json.dumps({"event": ev, "flow": f}))
                sys.stdout.flush()
            first = False
            q["since"] = "5s"
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass


# ---- status and the rest ----------------------------------------------------------------------


def _dump(doc, output: str) -> None:
    if output == "jsonl" and isinstance(doc, list):
        for x in doc:
            click.echo(json.dumps(x))
    else:
        click.echo(json.dumps(doc, indent=1))


def status(c: AgentClient, output: str) -> int:
    st = c.get("/status")
    if output == "json":
        _dump(st, "json")
        return 0 if st["healthy"] else 1
    con = _console()
    ok = "[green]healthy[/green]" if st["healthy"] else "[red]UNHEALTHY[/red]"
    con.print(f"node {st['node']}: {ok}")
    a = st["agent"]
    con.print(f"  agent       pid {a['pid']}, up {human_s(a['uptime_s'])}")
    t = st["tunnel"]
    if t["supervised"]:
        con.print(
            f"  tunnel      {'ready' if t['ready'] else 'NOT READY'}, pid {t['pid']}, "
            f"workers {t['workers']}, restarts {t['restarts']}, upgrades {t['upgrades']}"
        )
    else:
        con.print("  tunnel      not run by this agent")
    progs = st["datapath"]["programs"]
    attached = sum(1 for p in progs if p["attached"] == 1 or p.get("elsewhere"))
    # an optional program the kernel refused (the BPF LSM): not counted, said below
    progs_shown = [p for p in progs if p.get("pinned", True) or not p.get("optional")]
    con.print(
        f"  datapath    {attached}/{len(progs_shown)} programs attached, "
        f"pins {st['datapath']['pins']}"
    )
    for p in progs_shown:
        att = p["attached"]
        shown = (
            f"{att} {attached_to(p['hook'])}"
            if p.get("elsewhere")
            else {1: "attached", 0: "NOT ATTACHED"}.get(att, f"attached {att}x")
        )
        con.print(f"              {p['name']:<14}{p['hook']:<22}{shown}")
    ctl = st["control"]
    if ctl:
        state = "connected" if ctl["connected"] else "DISCONNECTED"
        stale = f", last heard {human_s(ctl['staleness_s'])} ago" if ctl["staleness_s"] else ""
        con.print(
            f"  control     {state} to {ctl['address']}, config version {ctl['config_version']}"
            f"{stale}"
        )
    else:
        con.print("  control     none (workloads from the config file)")
    wps = st["workloads"].get("waypoint_pods") or []
    con.print(
        f"  workloads   {st['workloads']['enrolled']} enrolled"
        + (f"; waypoint pods, not captured: {', '.join(wps)}" if wps else "")
    )
    sn, ks = st.get("same_node"), st.get("kernel_services")
    if sn:
        how = (
            f"in the kernel (verdicts generation {sn['generation']}: {sn['verdicts']})"
            if sn["mode"] == "direct"
            else f"{sn['mode']}" + (f" ({sn['kernel_lacks']})" if sn.get("kernel_lacks") else "")
        )
        con.print(f"  same node   {how}, {sn['direct_flows_reset']} direct flows ended by policy")
    if ks:
        con.print(
            "  services    "
            + (
                f"{ks['service_ports']} VIP ports resolved in the kernel"
                if not ks["why_tunnel"]
                else f"resolved by the tunnel ({ks['why_tunnel']})"
            )
            + (f", {len(ks['left_out'])} left to the tunnel" if ks["left_out"] else "")
        )
    cert = st["certificates"]
    if cert["soonest"]:
        s = cert["soonest"]
        con.print(
            f"  certs       {cert['count']}; soonest expiry {s['workload']} in "
            f"{human_s(s['seconds_left'])}"
        )
    maps = st["datapath"]["maps"]
    fills = [
        f"{k} {v['entries']}/{v['max']}"
        for k, v in maps.items()
        if v["entries"] is not None and v["max"]
    ]
    con.print(f"  maps        {', '.join(fills)}")
    n = st["datapath"]["counters"]
    refused = {
        "destination": n.get("dst_refused", 0),
        "ipv6": n.get("v6_refused", 0),
        "non-TCP": n.get("proto_refused", 0),
        "packet socket": n.get("family_refused", 0),
        "connection limit": n.get("limit_refused", 0),
        "policy": n.get("policy_refused", 0),
        "service without endpoint": n.get("svc_no_endpoint", 0),
        "guard": n.get("guard_drop", 0),
        "plaintext IPv6": n.get("plain_v6_drop", 0),
        "tunnel down": n.get("plain_no_tunnel", 0) + n.get("own_no_tunnel", 0),
    }
    con.print(
        "  refused     "
        + (", ".join(f"{k} {v}" for k, v in refused.items() if v) or "nothing")
        + " (in the kernel, since the datapath was loaded)"
    )
    pk = st["datapath"].get("packet_sockets")
    if pk:
        con.print(
            "  packet      "
            + (pk["detail"] if pk["refused"] else f"[yellow]NOT refused[/yellow]: {pk['detail']}")
        )
    fl = st["flows"]
    con.print(
        f"  flows       {fl['live']} open, {fl['closed_total']} closed since start "
        f"({fl['closed_kept']} kept)"
    )
    for p in st["problems"]:
        con.print(f"[red]problem:[/red] {p}")
    for w in st["warnings"]:
        con.print(f"[yellow]warning:[/yellow] {w}")
    return 0 if st["healthy"] else 1


def attached_to(hook: str) -> str:
    """What a program attached outside the node's cgroup is attached to, for status lines."""
    return {"sk_lookup": "ns", "lsm/socket_create": "hook"}.get(hook, "cgroup")


def _simple_table(rows: list[dict], cols: list[tuple[str, str]]) -> Table:
    t = Table(box=None, pad_edge=False, header_style="bold")
    for title, _ in cols:
        t.add_column(title)
    for r in rows:
        t.add_row(*[_fmt(r.get(k)) for _, k in cols])
    return t


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, list):
        return ", ".join(_fmt(x) for x in v) or "-"
    if isinstance(v, dict):
        return ", ".join(f"{k}={x}" for k, x in v.items()) or "-"
    return str(v)


def workloads(c: AgentClient, output: str, all_: bool) -> None:
    doc = c.get("/workloads", {"all": "1" if all_ else ""})
    if output == "json":
        return _dump(doc, "json")
    rows = [
        {**w, "cert": human_s(w["cert_seconds_left"]) if w["cert_seconds_left"] else None}
        for w in doc["workloads"]
    ]
    _console().print(
        _simple_table(
            rows,
            [
                ("WORKLOAD", "workload"),
                ("NODE", "node"),
                ("IP", "ip"),
                ("IDENTITY", "identity"),
                ("MTLS", "mtls_mode"),
                ("ENROLLED", "enrolled"),
                ("CERT LEFT", "cert"),
            ],
        )
    )


def _waypoint_text(s: dict):
    """What serves a service that opted into a waypoint (its connections go there), or why
    nothing does (they are refused)."""
    if not s.get("waypoint"):
        return []
    if s.get("waypoint_pods"):
        return f"through waypoint {s['waypoint']} ({', '.join(s['waypoint_pods'])})"
    why = s.get("waypoint_refusal") or "no Gateway (class istio-waypoint) defines it"
    return f"none: opts into waypoint {s['waypoint']} and {why} (connections refused)"


def services(c: AgentClient, output: str) -> None:
    doc = c.get("/services")
    if output == "json":
        return _dump(doc, "json")
    rows = [
        {
            **s,
            "ports": [f"{p['port']}->{p['target_port']}" for p in s["ports"]],
            "resolved_by": s.get("resolved_by", "tunnel")
            + (f" ({s['why_tunnel']})" if s.get("why_tunnel") else ""),
            "endpoints": s["endpoints"] or _waypoint_text(s),
        }
        for s in doc["services"]
    ]
    _console().print(
        _simple_table(
            rows,
            [
                ("SERVICE", "service"),
                ("VIP", "vip"),
                ("PORTS", "ports"),
                ("LB", "lb_policy"),
                ("RESOLVED BY", "resolved_by"),
                ("ENDPOINTS", "endpoints"),
            ],
        )
    )


def policies(c: AgentClient, output: str) -> None:
    doc = c.get("/policies")
    if output == "json":
        return _dump(doc, "json")
    rows = [
        {**p, "selector": p.get("selector") if p.get("has_selector") else "(every workload)"}
        for p in doc["policies"]
    ]
    _console().print(
        _simple_table(
            rows,
            [
                ("POLICY", "key"),
                ("ACTION", "action"),
                ("SELECTOR", "selector"),
                ("RULES", "rules"),
                ("FROM", "origin"),
            ],
        )
    )


def certs(c: AgentClient, output: str) -> None:
    doc = c.get("/certs")
    if output == "json":
        return _dump(doc, "json")
    con = _console()
    rows = [{**w, "left": human_s(w["seconds_left"])} for w in doc["workloads"]]
    if doc["node_cert"]:
        rows.append(
            {
                "workload": "(node)",
                **doc["node_cert"],
                "left": human_s(doc["node_cert"]["seconds_left"]),
            }
        )
    con.print(
        _simple_table(
            rows,
            [
                ("WORKLOAD", "workload"),
                ("IDENTITY", "spiffe_id"),
                ("SERIAL", "serial"),
                ("ISSUER", "issuer"),
                ("NOT BEFORE", "not_before"),
                ("NOT AFTER", "not_after"),
                ("LEFT", "left"),
            ],
        )
    )
    con.print("\nTrust bundle:")
    con.print(
        _simple_table(
            [{**r, "left": human_s(r["seconds_left"])} for r in doc["roots"]],
            [
                ("ROOT", "subject"),
                ("SHA-256", "sha256"),
                ("NOT AFTER", "not_after"),
                ("LEFT", "left"),
            ],
        )
    )


def policy_check(c: AgentClient, src: str, dst: str, port: int, output: str) -> int:
    d = c.get("/policy/check", {"from": src, "to": dst, "port": port})
    if output == "json":
        _dump(d, "json")
    else:
        color = "green" if d["verdict"] == "allow" else "red"
        con = _console()
        con.print(
            f"{d['from']['workload']} ({d['from']['identity']}) -> "
            f"{d['to']['workload']} port {d['to']['port']}: "
            f"[{color}]{d['verdict'].upper()}[/{color}]"
        )
        con.print(f"  {d['reason']}")
        if d["origin"]:
            con.print(f"  policy defined at {d['origin']}")
        con.print(f"  (snapshot version {d['version']}; the tunnel evaluates the same code)")
    return 0 if d["verdict"] == "allow" else 3


def config_dump(c: AgentClient) -> None:
    _dump(c.get("/config_dump"), "json")
