"""Per-flow statistics, metrics and the operator's CLI, against real traffic in a meshed lab.

Each flow moves a known number of bytes each way (a socat server reads the
whole request, then answers with a fixed number of bytes), so the kernel's
counts, `dabba flows` and Prometheus must all show exactly those numbers,
with the right identities, for HBONE, splice and passthrough alike.
"""

import json
import os
import re
import socket
import subprocess
import sys
import time

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from agent.lab import mesh
from tests.conftest import mesh_lab, wait_for, wait_port

TD = "cluster.local"


@pytest.fixture(scope="module")
def flab():
    yield from mesh_lab("fl", 2, 2, capture=True, same_node="tunnel")  # the tunnel's paths


def dabba(*args, check=True):
    r = subprocess.run(
        [sys.executable, "-m", "agent.cli", *args], capture_output=True, text=True, timeout=60
    )
    if check:
        assert r.returncode == 0, f"dabba {' '.join(args)}: {r.stderr}"
    return r


def flows(L, node, *args) -> list[dict]:
    return json.loads(dabba("flows", "--node", f"{L.name}/{node}", "-o", "json", *args).stdout)[
        "flows"
    ]


def serve(L, procs, target, ip, port, answer):
    """A server on ip:port that reads the whole request, then sends `answer` bytes and closes."""
    p = L.popen(
        target,
        [
            "socat",
            f"TCP-LISTEN:{port},bind={ip},fork,reuseaddr",
            f"SYSTEM:cat >/dev/null; head -c {answer} /dev/zero",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    procs.append(p)
    wait_port(L, target, ip, port)


def exchange(L, src, ip, port, request) -> int:
    """Send `request` bytes, half-close, read the answer; returns how many bytes came back."""
    r = L.run(
        src,
        ["sh", "-c", f"head -c {request} /dev/urandom | socat -t 5 - TCP:{ip}:{port} | wc -c"],
        check=False,
    )
    return int(r.stdout.strip() or -1)


def one(fs: list[dict], **want) -> dict:
    got = [f for f in fs if all(_get(f, k) == v for k, v in want.items())]
    assert len(got) == 1, f"{want}: {len(got)} matching flows in {json.dumps(fs, indent=1)[:3000]}"
    return got[0]


def _get(f, key):
    for part in key.split("__"):
        f = f[part]
    return f


def spiffe(pod) -> str:
    return f"spiffe://{TD}/ns/{pod.namespace}/sa/{pod.service_account}"


def scrape(L, node) -> dict:
    """The node's 15020 /metrics: {(name, frozenset(labels)): value}."""
    r = L.run(node, ["curl", "-s", "--max-time", "5", f"http://{L.node(node).ip}:15020/metrics"])
    out = {}
    for fam in text_string_to_metric_families(r.stdout):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def sample(metrics: dict, name: str, **labels) -> float:
    hits = [
        v
        for (n, ls), v in metrics.items()
        if n == name and all((k, v2) in ls for k, v2 in labels.items())
    ]
    assert len(hits) == 1, f"{name}{labels}: {len(hits)} series"
    return hits[0]


def test_hbone_flow_counted_exactly_on_both_nodes_with_identities(flab, procs):
    L, _ = flab
    a, b = L.pod("n1-p1"), L.pod("n2-p1")
    serve(L, procs, b.name, b.ip, 9000, 3333)
    assert exchange(L, a.name, b.ip, 9000, 100_000) == 3333
    wait_for(lambda: flows(L, "n1", "--port", "9000", "--state", "closed"), 5, what="n1 record")
    wait_for(lambda: flows(L, "n2", "--port", "9000", "--state", "closed"), 5, what="n2 record")
    src = one(flows(L, "n1", "--port", "9000"))
    assert (src["path"], src["security"], src["verdict"], src["reporter"]) == (
        "hbone",
        "mutual_tls",
        "allow",
        "source",
    )
    assert (src["bytes_to_dst"], src["bytes_to_src"]) == (100_000, 3333)
    assert (src["src"]["identity"], src["dst"]["identity"]) == (spiffe(a), spiffe(b))
    assert (src["src"]["workload"], src["dst"]["workload"]) == (
        f"{a.namespace}/{a.name}",
        f"{b.namespace}/{b.name}",
    )
    assert src["dst"]["ip"] == b.ip and src["close"] == "fin" and src["end"] >= src["start"]
    assert src["segs_out"] > 0 and src["srtt_us"] > 0
    dst = one(flows(L, "n2", "--port", "9000"))
    assert (dst["path"], dst["security"], dst["reporter"]) == ("hbone", "mutual_tls", "destination")
    assert (dst["bytes_to_dst"], dst["bytes_to_src"]) == (100_000, 3333)
    assert (dst["src"]["identity"], dst["src"]["workload"], dst["src"]["ip"]) == (
        spiffe(a),
        f"{a.namespace}/{a.name}",
        a.ip,
    )
    assert dst["reason"] == "allowed: no ALLOW policy applies to the workload"
    # Istio's byte counters, from the same kernel records, on both reporters
    for node, reporter in (("n1", "source"), ("n2", "destination")):
        m = scrape(L, node)
        labels = {
            "reporter": reporter,
            "source_workload": a.name,
            "source_principal": spiffe(a),  # Istio's form: spiffe://td/ns/N/sa/S
            "destination_workload": b.name,
            "destination_workload_namespace": b.namespace,
            "destination_principal": spiffe(b),
            "connection_security_policy": "mutual_tls",
            "request_protocol": "tcp",
        }
        assert sample(m, "istio_tcp_received_bytes_total", **labels) == 100_000
        assert sample(m, "istio_tcp_sent_bytes_total", **labels) == 3333
        assert sample(m, "istio_tcp_connections_opened_total", **labels) == 1
        assert sample(m, "istio_tcp_connections_closed_total", **labels) == 1
        assert (
            sample(
                m,
                "dabba_flow_rtt_seconds_count",
                destination_workload=b.name,
                destination_workload_namespace=b.namespace,
            )
            == 1
        )


def test_spliced_flow_counted_exactly_at_both_ends(flab, procs):
    L, _ = flab
    a, b = L.pod("n1-p1"), L.pod("n1-p2")
    serve(L, procs, b.name, b.ip, 9001, 4444)
    assert exchange(L, a.name, b.ip, 9001, 54_321) == 4444
    wait_for(lambda: len(flows(L, "n1", "--port", "9001", "--state", "closed")) == 2, 5)
    fs = flows(L, "n1", "--path", "splice")
    assert len(fs) == 2
    for reporter in ("source", "destination"):
        f = one(fs, reporter=reporter)
        assert (f["security"], f["verdict"]) == ("node_local", "allow")
        assert (f["bytes_to_dst"], f["bytes_to_src"]) == (54_321, 4444)
        assert (f["src"]["identity"], f["dst"]["identity"]) == (spiffe(a), spiffe(b))
    m = scrape(L, "n1")
    for reporter in ("source", "destination"):
        labels = {
            "reporter": reporter,
            "source_workload": a.name,
            "destination_workload": b.name,
            "connection_security_policy": "node_local",
        }
        assert sample(m, "istio_tcp_received_bytes_total", **labels) == 54_321
        assert sample(m, "istio_tcp_sent_bytes_total", **labels) == 4444


def test_passthrough_flow_outside_the_mesh_is_plaintext_and_counted(flab, procs):
    L, _ = flab
    a = L.pod("n1-p1")
    outside = mesh.CONTROL_IP  # the lab's own address: no workload of the mesh
    serve(L, procs, "lab", outside, 9003, 888)
    assert exchange(L, a.name, outside, 9003, 777) == 888
    wait_for(lambda: flows(L, "n1", "--port", "9003", "--state", "closed"), 5)
    f = one(flows(L, "n1", "--port", "9003"))
    assert (f["path"], f["security"], f["verdict"]) == ("passthrough", "plaintext", "allow")
    assert (f["bytes_to_dst"], f["bytes_to_src"]) == (777, 888)
    assert f["src"]["identity"] == spiffe(a) and f["dst"]["workload"] == ""
    assert f["dst"]["ip"] == outside
    m = scrape(L, "n1")
    labels = {
        "reporter": "source",
        "source_workload": a.name,
        "destination_workload": "unknown",
        "connection_security_policy": "none",
    }
    assert sample(m, "istio_tcp_received_bytes_total", **labels) == 777
    assert sample(m, "istio_tcp_sent_bytes_total", **labels) == 888


def _deny(L, name, target_app, from_principal):
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": name, "namespace": "default"},
        "spec": {
            "action": "DENY",
            "selector": {"matchLabels": {"app": target_app}},
            "rules": [{"from": [{"source": {"principals": [from_principal]}}]}],
        },
    }
    path = os.path.join(mesh.paths(L)["registry"], f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)


def _has_policy(L, node, key) -> bool:
    r = dabba("policies", "--node", f"{L.name}/{node}", "-o", "json")
    return key in {p["key"] for p in json.loads(r.stdout)["policies"]}


def _tunnel_policies(L, node) -> set[str]:
    r = L.run(node, ["curl", "-s", "--max-time", "2", "http://127.0.0.1:15000/config_dump"])
    return {p["name"] for p in json.loads(r.stdout)["policies"]}


def test_denied_connections_appear_with_their_reason(flab, procs):
    L, _ = flab
    a, same, other = L.pod("n1-p1"), L.pod("n1-p2"), L.pod("n2-p2")
    p = spiffe(a).removeprefix("spiffe://")
    _deny(L, "deny-same", same.name, p)
    _deny(L, "deny-other", other.name, p)
    wait_for(lambda: _has_policy(L, "n1", "default/deny-same"), 15, what="n1 policy")
    wait_for(lambda: _has_policy(L, "n2", "default/deny-other"), 15, what="n2 policy")
    for node, key in (("n1", "default/deny-same"), ("n2", "default/deny-other")):
        wait_for(lambda n=node, k=key: k in _tunnel_policies(L, n), 15, what=f"{node}'s tunnel")
    serve(L, procs, same.name, same.ip, 9005, 10)
    serve(L, procs, other.name, other.ip, 9006, 10)
    assert exchange(L, a.name, same.ip, 9005, 10) == 0
    assert exchange(L, a.name, other.ip, 9006, 10) == 0
    wait_for(lambda: len(flows(L, "n1", "--verdict", "deny", "--state", "closed")) == 2, 5)
    denied = flows(L, "n1", "--verdict", "deny")
    local = one(denied, dst__workload=f"default/{same.name}")
    assert local["path"] == "denied" and local["policy"] == "default/deny-same"
    assert local["reason"] == "denied by DENY policy default/deny-same rule 0"
    assert local["close"] == "reset"
    remote = one(denied, dst__workload=f"default/{other.name}")
    assert remote["path"] == "denied"
    assert remote["reason"].startswith("denied by the destination")
    assert "default/deny-other" in remote["reason"]
    m = scrape(L, "n1")
    assert sample(m, "dabba_drops_total", reason="policy") == 2
    # a denied flow's bytes are not traffic between the workloads: n1-p1 -> n1-p2 still shows
    # exactly the spliced flow's request, and nothing at all went to n2-p2
    labels = {"reporter": "source", "source_workload": a.name, "destination_workload": same.name}
    assert sample(m, "istio_tcp_received_bytes_total", **labels) == 54_321
    assert not [
        k
        for k in m
        if k[0].startswith("istio_tcp_") and ("destination_workload", other.name) in k[1]
    ]


def test_flow_filters_summary_and_table(flab):
    L, _ = flab
    node = f"{L.name}/n1"
    every = flows(L, "n1")
    assert every and all(f["src"]["workload"] or f["dst"]["workload"] for f in every)
    by_wl = flows(L, "n1", "--workload", "n2-p1")
    assert by_wl and all(f["dst"]["workload"] == "default/n2-p1" for f in by_wl)
    by_bytes = flows(L, "n1", "--sort", "bytes", "--limit", "1")
    assert by_bytes[0]["bytes_to_dst"] + by_bytes[0]["bytes_to_src"] == max(
        f["bytes_to_dst"] + f["bytes_to_src"] for f in every
    )
    assert flows(L, "n1", "--namespace", "nowhere") == []
    summary = json.loads(dabba("flows", "--node", node, "--summary", "-o", "json").stdout)
    row = next(r for r in summary["pairs"] if r["dst"] == "default/n2-p1" and r["path"] == "hbone")
    assert (row["src"], row["flows"], row["bytes_to_dst"], row["bytes_to_src"]) == (
        "default/n1-p1",
        1,
        100_000,
        3333,
    )
    table = dabba("flows", "--node", node).stdout
    assert "default/n2-p1:9000" in table and "hbone" in table and "mTLS" in table
    jl = dabba("flows", "--node", node, "-o", "jsonl", "--path", "splice").stdout.splitlines()
    assert len(jl) == 2 and {json.loads(x)["path"] for x in jl} == {"splice"}


def test_follow_streams_a_flow_as_it_opens_and_closes(flab, procs):
    L, _ = flab
    a, b = L.pod("n1-p2"), L.pod("n2-p2")
    serve(L, procs, b.name, b.ip, 9007, 55)
    f = subprocess.Popen(
        [sys.executable, "-m", "agent.cli", "flows", "--node", f"{L.name}/n1", "--follow",
         "-o", "jsonl", "--port", "9007"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    procs.append(f)
    time.sleep(1.5)
    L.run(a.name, ["sh", "-c", f"(head -c 66 /dev/zero; sleep 1.5) | socat -t 5 - TCP:{b.ip}:9007"])
    events = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and len(events) < 2:
        events.append(json.loads(f.stdout.readline()))
    f.kill()
    assert [e["event"] for e in events] == ["open", "close"]
    assert events[1]["flow"]["bytes_to_dst"] == 66 and events[1]["flow"]["bytes_to_src"] == 55


def test_status_workloads_certs_services_and_config_dump(flab):
    L, _ = flab
    node = f"{L.name}/n1"
    st = json.loads(dabba("status", "--node", node, "-o", "json").stdout)
    assert st["healthy"] and st["tunnel"]["ready"] and st["control"]["connected"]
    assert st["workloads"]["enrolled"] == 2
    assert all(p["attached"] == 1 for p in st["datapath"]["programs"] if not p["elsewhere"])
    text = dabba("status", "--node", node).stdout
    assert "healthy" in text and "connected to" in text
    wl = json.loads(dabba("workloads", "--node", node, "-o", "json").stdout)["workloads"]
    assert sorted(w["workload"] for w in wl) == ["default/n1-p1", "default/n1-p2"]
    assert all(w["enrolled"] and w["identity"].startswith("spiffe://") for w in wl)
    every = json.loads(dabba("workloads", "--node", node, "--all", "-o", "json").stdout)
    assert len(every["workloads"]) == 4
    certs = json.loads(dabba("certs", "--node", node, "-o", "json").stdout)
    assert [c["spiffe_id"] for c in certs["workloads"]] == [
        spiffe(L.pod("n1-p1")),
        spiffe(L.pod("n1-p2")),
    ]
    assert all(0 < c["seconds_left"] <= 86400 for c in certs["workloads"])
    assert certs["roots"] and certs["roots"][0]["seconds_left"] > 86400
    assert "Trust bundle" in dabba("certs", "--node", node).stdout
    json.loads(dabba("services", "--node", node, "-o", "json").stdout)
    dump = json.loads(dabba("config-dump", "--node", node).stdout)
    assert dump["agent"]["config"]["node"] == "n1"
    assert "policies" in dump["tunnel"] and dump["snapshot"]["workloads"]
    raw = json.dumps(dump)
    assert "PRIVATE KEY" not in raw
    with open(dump["agent"]["config"]["control"]["token_file"]) as f:
        assert f.read().strip() not in raw  # the join token's path, never the token
    # certificates shown (certs, config-dump) and issued were read without an X.509 library
    # (cryptography's: 10 MiB of a process, agent/certread.py), the control plane's messages
    # without protobuf's runtime (3 MiB, agent/control/wire.py): neither the agent nor its
    # tunnel maps either
    st = mesh.agent_status(L, "n1")
    for pid in (st["pid"], st["tunnel"]["pid"]):
        assert _maps(pid, "/cryptography/", "/google/") == []
    m = scrape(L, "n1")
    exp = sample(
        m, "dabba_certificate_expiry_timestamp_seconds", workload="n1-p1", namespace="default"
    )
    assert abs(exp - (time.time() + certs["workloads"][0]["seconds_left"])) < 5
    assert sample(m, "dabba_control_connected") == 1
    assert sample(m, "dabba_bpf_map_max_entries", map="dabba_flows") > 0


def test_cli_errors_are_clear_and_non_zero(flab, tmp_path):
    L, _ = flab
    node = f"{L.name}/n1"
    r = dabba("flows", "--state-dir", str(tmp_path), check=False)
    assert r.returncode == 1 and "the agent is not running" in r.stderr
    assert f"{tmp_path}/agent.sock does not exist" in r.stderr
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(tmp_path / "agent.sock"))  # bound, never listening: a dead agent's socket
    r = dabba("status", "--state-dir", str(tmp_path), check=False)
    stale.close()
    assert r.returncode == 1 and "nothing listens" in r.stderr
    for args, msg in (
        (["--since", "abc"], "--since: 'abc' is not a duration"),
        (["--verdict", "maybe"], "--verdict 'maybe' is not one of: allow, deny"),
        (["--port", "70000"], "--port 70000 is out of range"),
        (["--sort", "size"], "--sort 'size' is not one of"),
    ):
        r = dabba("flows", "--node", node, *args, check=False)
        assert r.returncode == 1 and msg in r.stderr, r.stderr
    r = dabba("policy", "check", "--node", node, "--from", "nope", "--to", "n1-p2", "--port", "80",
              check=False)  # fmt: skip
    assert r.returncode == 1 and "--from: no workload 'nope'" in r.stderr
    r = dabba("policy", "check", "--node", node, "--from", "n1-p1", "--to", "n2-p1", "--port", "80",
              check=False)  # fmt: skip
    assert r.returncode == 1 and "runs on node n2" in r.stderr and "hint:" in r.stderr
    r = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
         "agent.cli", "status", "--node", node],
        capture_output=True, text=True, cwd=os.getcwd(),
    )  # fmt: skip
    assert r.returncode == 1 and "root-only" in r.stderr, r.stderr


def test_a_real_prometheus_scrapes_the_node(flab, procs, tmp_path):
    L, _ = flab
    n1 = L.node("n1")
    cfg = tmp_path / "prometheus.yml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [os.path.abspath("deploy/prometheus/dabba-rules.yaml")],
                "scrape_configs": [
                    {"job_name": "dabba", "static_configs": [{"targets": [f"{n1.ip}:15020"]}]}
                ],
            }
        )
    )
    os.chmod(tmp_path, 0o777)
    p = L.popen(
        "n1",
        [
            "prometheus",
            f"--config.file={cfg}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            "--web.listen-address=127.0.0.1:19090",
        ],
        stdout=subprocess.DEVNULL,
        stderr=open(tmp_path / "prometheus.log", "w"),  # noqa: SIM115
    )
    procs.append(p)

    refused: dict[str, str] = {}

    def query(q):
        """PromQL q's result; None when Prometheus refuses it (its reason in refused[q]), or has
        not answered in six tries (an answer slowed by a loaded machine is asked for again: a
        3 s limit, then three tries of 10 s, made it a refusal when the VMs of make
        vagrant-test ran alongside)."""
        for _ in range(6):
            r = L.run(
                "n1",
                ["curl", "-s", "--max-time", "10", "http://127.0.0.1:19090/api/v1/query",
                 "--data-urlencode", f"query={q}"],
                check=False,
            )  # fmt: skip
            try:
                doc = json.loads(r.stdout) if r.returncode == 0 else None
            except ValueError:  # not ready yet ("Service Unavailable")
                doc = None
            if doc is not None:
                if doc.get("status") == "success":
                    return doc["data"]["result"]
                refused[q] = f"{doc.get('errorType')}: {doc.get('error')}"
                return None
            refused[q] = f"no answer (curl exit {r.returncode})"
            time.sleep(1)
        return None

    # a flow of its own, whatever ran before it in this lab: the counter grows by its bytes
    a, b = L.pod("n1-p1"), L.pod("n2-p1")
    labels = {"reporter": "source", "source_workload": a.name, "destination_workload": b.name,
              "connection_security_policy": "mutual_tls"}  # fmt: skip

    def counted() -> float:
        hits = [v for (n, ls), v in scrape(L, "n1").items()
                if n == "istio_tcp_received_bytes_total"
                and all((k, x) in ls for k, x in labels.items())]  # fmt: skip
        assert len(hits) <= 1, hits
        return hits[0] if hits else 0.0

    base = counted()
    serve(L, procs, b.name, b.ip, 9011, 10)
    assert exchange(L, a.name, b.ip, 9011, 77_777) == 10
    wait_for(lambda: counted() == base + 77_777, 10, what="the node to count the flow")
    q = "istio_tcp_received_bytes_total{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}"

    def scraped_total():
        res = query(q)
        return res if res and float(res[0]["value"][1]) == base + 77_777 else None

    res = wait_for(scraped_total, 60, interval=0.5, what="prometheus to scrape the node's count")
    assert len(res) == 1 and res[0]["metric"]["job"] == "dabba"
    up = query('up{job="dabba"}')
    assert up and up[0]["value"][1] == "1"

    # deploy/'s rules load and evaluate; none fires on this healthy node
    def rules():
        r = L.run("n1", ["curl", "-s", "http://127.0.0.1:19090/api/v1/rules"], check=False)
        groups = json.loads(r.stdout)["data"]["groups"] if r.returncode == 0 else []
        return [
            x for g in groups for x in g["rules"] if x.get("lastEvaluation", "").startswith("2")
        ]

    wait_for(lambda: len(rules()) == 10, 20, interval=0.5, what="the rules to be evaluated")
    assert all(x["health"] == "ok" and x["state"] == "inactive" for x in rules()), rules()
    # every expression of deploy/'s Grafana dashboard is valid PromQL and names only series the
    # node exports
    with open("deploy/grafana/dabbawala-dashboard.json") as f:
        dash = json.load(f)
    r = L.run("n1", ["curl", "-s", "--max-time", "5", f"http://{n1.ip}:15020/metrics"])
    scraped = {  # every family declared, with or without samples yet (no retransmits here)
        fam.name + suffix
        for fam in text_string_to_metric_families(r.stdout)
        for suffix in ("", "_total", "_bucket", "_count", "_sum")
    }
    exprs = [t["expr"] for panel in dash["panels"] for t in panel["targets"]]
    assert len(exprs) >= 13
    for e in exprs:
        q = e.replace("$instance", ".*")
        assert query(q) is not None, (e, refused.get(q))
        for pattern in re.findall(r'__name__=~"([^"]+)"', e):
            assert any(re.fullmatch(pattern, n) for n in scraped), f"{pattern} (in {e})"
        plain = re.sub(r'__name__=~"[^"]+"', "", e)
        for name in re.findall(r"\b((?:istio|dabba)_[a-z_]+)", plain):
            assert name in scraped, f"{name} (in {e}) is not exported"


def _maps(pid: int, *dirs: str) -> list[str]:
    """The files under any of these folders (a library's) that process pid has mapped."""
    with open(f"/proc/{pid}/maps") as f:
        return sorted({ln.split()[-1] for ln in f if any(d in ln for d in dirs)})
