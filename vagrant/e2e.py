"""End-to-end checks across the Vagrant VMs (run by vagrant/run-test.sh, inside its netns).

On real VMs with a real systemd, installed by `dabba install systemd`:
1. the units are active, Type=notify, with a watchdog; the agent's feature probe is recorded
   (kernel TLS: the guest kernel has it, the build host does not);
2. a workload on node1 sends 100,000 bytes to a workload on node2, which answers 3,333:
   through HBONE, and a capture on the private network shows no plaintext and TLS 1.3;
3. `dabba flows` on each node shows that flow with exact bytes and both SPIFFE identities;
4. an Istio AuthorizationPolicy (DENY) on the control plane is enforced, and shown;
5. a connection held open through `systemctl restart dabba-agent` and `systemctl stop
   dabba-agent` on both nodes keeps moving bytes, and new connections work while the agent
   is stopped (the programs stay pinned; the tunnel is its own service);
6. a workload's packet socket (AF_PACKET, and the old AF_INET SOCK_PACKET) is refused in the
   kernel (the BPF LSM: the guests boot with lsm=...,bpf), counted; the node's own is not;
7. `dabba uninstall systemd` on node1 removes the units, detaches and unpins every program:
   nothing under /sys/fs/bpf/dabba, nothing attached to a cgroup, no dabba program in the
   kernel; config and state stay (no --purge).

Every command goes through `ssh -F <vagrant ssh-config>`; nothing here is faked.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

TD = "cluster.local"
MARKER = b"dabbawala-vagrant-plaintext-marker-5c1e"
NODES = {"node1": ("192.168.56.11", "10.20.1"), "node2": ("192.168.56.12", "10.20.2")}
WL = {"node1": "client", "node2": "server"}  # one workload per node: its name = service account

args: argparse.Namespace
report: dict = {"checks": []}


def log(msg: str) -> None:
    print(f"e2e: {msg}", flush=True)


def ssh(vm: str, cmd: str, check: bool = True, timeout: float = 120, **kw):
    r = subprocess.run(
        [
            "ssh",
            "-F",
            args.ssh_config,
            "-o",
            "LogLevel=ERROR",
            vm,
            "sudo sh -c " + shlex.quote(cmd),
        ],
        capture_output=True,
        text=kw.pop("text", True),
        timeout=timeout,
        **kw,
    )
    if check and r.returncode != 0:
        raise SystemExit(f"e2e: on {vm}: `{cmd}` exited {r.returncode}: {r.stderr} {r.stdout}")
    return r


def wait(pred, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(1)
    raise SystemExit(f"e2e: timed out after {timeout:.0f}s waiting for {what}")


def check(name: str, ok: bool, detail) -> None:
    report["checks"].append({"check": name, "ok": bool(ok), "detail": detail})
    log(f"{'ok  ' if ok else 'FAIL'} {name}: {detail}")
    if not ok:
        raise SystemExit(f"e2e: check failed: {name}: {detail}")


def flows(vm: str, *extra: str) -> list[dict]:
    r = ssh(vm, "dabba flows -o json " + " ".join(extra))
    return json.loads(r.stdout)["flows"]


def spiffe(sa: str) -> str:
    return f"spiffe://{TD}/ns/default/sa/{sa}"


def in_workload(vm: str, cmd: str) -> str:
    """A shell line that runs cmd inside the node's workload (its cgroup and netns)."""
    w = WL[vm]
    return (
        f"echo $$ > /sys/fs/cgroup/kubepods.slice/{w}/cgroup.procs && "
        f"exec ip netns exec {w} sh -c {shlex.quote(cmd)}"
    )


def units_and_probe() -> None:
    for vm in NODES:
        r = ssh(
            vm,
            "systemctl show -p ActiveState -p Type -p WatchdogUSec -p NRestarts "
            "dabba-agent dabba-tunnel",
        )
        states = [dict(line.split("=", 1) for line in block.splitlines() if "=" in line)
                  for block in r.stdout.strip().split("\n\n")]  # fmt: skip
        check(
            f"{vm}: dabba-agent and dabba-tunnel active, Type=notify, watchdog 30s",
            all(
                s.get("ActiveState") == "active"
                and s.get("Type") == "notify"
                and s.get("WatchdogUSec") == "30s"
                for s in states
            ),  # fmt: skip
            states,
        )
        probe = ssh(vm, "dabba agent run --config /etc/dabba/agent.yaml --check").stdout
        line = next(x.strip() for x in probe.splitlines() if "kernel TLS" in x)
        report.setdefault("feature_probe", {})[vm] = line
        check(f"{vm}: the agent's feature probe sees kernel TLS", "kernel TLS yes" in line, line)
    r = ssh("control", "systemctl show -p ActiveState -p Type dabba-control")
    check("control: dabba-control active, Type=notify", "ActiveState=active" in r.stdout
          and "Type=notify" in r.stdout, r.stdout.split())  # fmt: skip


def workloads() -> None:
    """One workload per node: a netns with a veth, a cgroup below kubepods.slice; registry."""
    docs = []
    for vm, (_ip, pfx) in NODES.items():
        w = WL[vm]
        other = [p for v, (_, p) in NODES.items() if v != vm][0]
        other_ip = [i for v, (i, _) in NODES.items() if v != vm][0]
        ssh(
            vm,
            f"ip netns add {w} && ip link add {w}-h type veth peer name eth0 netns {w} && "
            f"ip addr add {pfx}.1/24 dev {w}-h && ip link set {w}-h up && "
            f"ip -n {w} addr add {pfx}.11/24 dev eth0 && ip -n {w} link set eth0 up && "
            f"ip -n {w} link set lo up && ip -n {w} route add default via {pfx}.1 && "
            f"sysctl -qw net.ipv4.ip_forward=1 && ip route add {other}.0/24 via {other_ip} && "
            f"mkdir -p /sys/fs/cgroup/kubepods.slice/{w}",
        )
        docs.append(
            {
                "apiVersion": "dabbawala.io/v1",
                "kind": "Workload",
                "metadata": {"name": w, "namespace": "default", "labels": {"app": w}},
                "spec": {
                    "serviceAccount": w,
                    "node": vm,
                    "ip": f"{pfx}.11",
                    "cgroup": f"/sys/fs/cgroup/kubepods.slice/{w}",
                    "netns": f"/run/netns/{w}",
                },
            }
        )
    text = "\n---\n".join(json.dumps(d) for d in docs)  # JSON is YAML
    ssh("control", f"cat > /etc/dabba/registry/e2e.yaml <<'EOF'\n{text}\nEOF")
    for vm in NODES:
        wait(
            lambda vm=vm: f"default/{WL[vm]}"
            in {
                c["workload"]
                for c in json.loads(ssh(vm, "dabba certs -o json").stdout)["workloads"]
            },
            120,
            f"{vm}'s workload certificate",
        )
    log("workloads client (node1) and server (node2) registered, certificates issued")


def bridge() -> str:
    r = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True)
    for line in r.stdout.splitlines():
        if " 192.168.56.1/" in line:
            return line.split()[1]
    raise SystemExit("e2e: no bridge of the private network (192.168.56.1) in this namespace")


def hbone_bytes_and_no_plaintext() -> None:
    server = in_workload(
        "node2",
        "socat TCP-LISTEN:9000,bind=10.20.2.11,fork,reuseaddr "
        "SYSTEM:'cat >/dev/null; head -c 3333 /dev/zero'",
    )
    ssh("node2", f"setsid nohup sh -c {shlex.quote(server)} </dev/null >/dev/null 2>&1 &")
    wait(lambda: ssh("node2", "ip netns exec server ss -Hltn 'sport = :9000'").stdout.strip(), 30,
         "the server on node2")  # fmt: skip
    pcap = os.path.join(args.out, "private-network.pcap")
    dev = bridge()
    cap = subprocess.Popen(["tcpdump", "-i", dev, "-U", "-w", pcap, "tcp"],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    time.sleep(2)
    ssh(
        "node1",
        "python3 -c 'import sys; m = sys.argv[1].encode(); "
        "sys.stdout.buffer.write((m * (100000 // len(m) + 1))[:100000])' "
        f"{MARKER.decode()} > /tmp/req",
    )
    check(
        "request file of 100,000 bytes",
        ssh("node1", "wc -c < /tmp/req").stdout.strip() == "100000",
        "/tmp/req",
    )
    r = ssh("node1", in_workload("node1", "socat -t 10 - TCP:10.20.2.11:9000 < /tmp/req | wc -c"))
    got = int(r.stdout.strip() or -1)
    time.sleep(2)
    cap.terminate()
    cap.wait(10)
    with open(pcap, "rb") as f:
        data = f.read()
    check("node1 -> node2: 100,000 bytes sent, 3,333 answered", got == 3333, got)
    check(
        f"capture on {dev}: the flow crossed the private network, never in plaintext",
        len(data) > 100_000 and MARKER not in data,
        {"pcap_bytes": len(data), "marker_found": MARKER in data},
    )
    check("capture: TLS 1.3 (ServerHello supported_versions 0x0304)",
          b"\x00\x2b\x00\x02\x03\x04" in data, "present")  # fmt: skip

    src = wait(lambda: [f for f in flows("node1", "--port", "9000", "--state", "closed")], 30,
               "node1's flow record")  # fmt: skip
    dst = wait(lambda: [f for f in flows("node2", "--port", "9000", "--state", "closed")], 30,
               "node2's flow record")  # fmt: skip
    for vm, fs, reporter in (("node1", src, "source"), ("node2", dst, "destination")):
        f = fs[0]
        got = {
            "flows": len(fs), "path": f["path"], "security": f["security"],
            "reporter": f["reporter"], "bytes_to_dst": f["bytes_to_dst"],
            "bytes_to_src": f["bytes_to_src"], "src": f["src"]["identity"],
            "dst": f["dst"]["identity"],
        }  # fmt: skip
        want = {
            "flows": 1, "path": "hbone", "security": "mutual_tls", "reporter": reporter,
            "bytes_to_dst": 100_000, "bytes_to_src": 3333, "src": spiffe("client"),
            "dst": spiffe("server"),
        }  # fmt: skip
        check(f"{vm}: dabba flows shows the flow, exact bytes, both identities", got == want, got)


def policy_deny() -> None:
    server = in_workload("node2", "socat TCP-LISTEN:9001,bind=10.20.2.11,fork,reuseaddr "
                                  "SYSTEM:'head -c 10 /dev/zero'")  # fmt: skip
    ssh("node2", f"setsid nohup sh -c {shlex.quote(server)} </dev/null >/dev/null 2>&1 &")
    doc = {
        "apiVersion": "security.istio.io/v1",
        "kind": "AuthorizationPolicy",
        "metadata": {"name": "deny-client-9001", "namespace": "default"},
        "spec": {
            "action": "DENY",
            "selector": {"matchLabels": {"app": "server"}},
            "rules": [
                {
                    "from": [{"source": {"principals": [f"{TD}/ns/default/sa/client"]}}],
                    "to": [{"operation": {"ports": ["9001"]}}],
                }
            ],
        },
    }
    ssh("control", f"cat > /etc/dabba/registry/deny.yaml <<'EOF'\n{json.dumps(doc)}\nEOF")
    wait(
        lambda: "default/deny-client-9001"
        in {
            p["key"] for p in json.loads(ssh("node2", "dabba policies -o json").stdout)["policies"]
        },
        60,
        "the policy on node2",
    )
    r = ssh("node1", in_workload("node1", "socat -t 5 - TCP:10.20.2.11:9001 </dev/null | wc -c"),
            check=False)  # fmt: skip
    check("DENY policy: client -> server:9001 gets nothing", r.stdout.strip() == "0", r.stdout)
    r = ssh("node1", in_workload("node1", "socat -t 10 - TCP:10.20.2.11:9000 < /tmp/req | wc -c"))
    check("... while client -> server:9000 is still allowed", r.stdout.strip() == "3333", r.stdout)
    fs = wait(lambda: flows("node1", "--port", "9001", "--verdict", "deny"), 30, "the denied flow")
    check("node1: dabba flows shows the denial with its reason",
          "default/deny-client-9001" in fs[0]["reason"], fs[0]["reason"])  # fmt: skip


PACKET = (
    "import socket,sys\n"
    "out = []\n"
    "for fam, typ in ((socket.AF_PACKET, socket.SOCK_RAW), (socket.AF_INET, 10)):\n"
    "    try:\n"
    "        socket.socket(fam, typ, 0).close(); out.append('open')\n"
    "    except OSError as e:\n"
    "        out.append(e.__class__.__name__)\n"
    "print(' '.join(out))\n"
)


def packet_sockets_refused() -> None:
    vm = "node1"
    st = json.loads(ssh(vm, "dabba status -o json").stdout)["datapath"]
    check(f"{vm}: dabba status: packet sockets refused in the kernel",
          st["packet_sockets"]["refused"], st["packet_sockets"])  # fmt: skip
    before = st["counters"]["family_refused"]
    r = ssh(vm, in_workload(vm, f"python3 -c {shlex.quote(PACKET)}"))
    check(f"{vm}: the workload's AF_PACKET and AF_INET SOCK_PACKET sockets are refused",
          r.stdout.split() == ["PermissionError", "PermissionError"], r.stdout)  # fmt: skip
    # the node's own are not refused (the guest may still lack af_packet: an error, not EPERM)
    r = ssh(vm, f"modprobe af_packet 2>/dev/null; python3 -c {shlex.quote(PACKET)}")
    check(f"{vm}: the node's own (no workload) are not refused",
          len(r.stdout.split()) == 2 and "PermissionError" not in r.stdout, r.stdout)  # fmt: skip
    after = json.loads(ssh(vm, "dabba status -o json").stdout)["datapath"]["counters"]
    check(f"{vm}: exactly those 2 refusals counted", after["family_refused"] - before == 2,
          after["family_refused"] - before)  # fmt: skip


HOLD = (
    "import socket,sys\n"
    "s=socket.create_connection(('10.20.2.11',9002),timeout=20)\n"
    "t=0\n"
    "for line in sys.stdin:\n"
    "    n=int(line); s.sendall(b'x'*n); g=0\n"
    "    while g<n:\n"
    "        b=s.recv(n-g)\n"
    "        if not b: print('eof',t,flush=True); sys.exit(1)\n"
    "        g+=len(b)\n"
    "    t+=n; print('ok',t,flush=True)\n"
)


def restart_keeps_connections() -> None:
    server = in_workload("node2", "socat TCP-LISTEN:9002,bind=10.20.2.11,fork,reuseaddr EXEC:cat")
    ssh("node2", f"setsid nohup sh -c {shlex.quote(server)} </dev/null >/dev/null 2>&1 &")
    time.sleep(1)
    ssh("node1", f"cat > /tmp/hold.py <<'EOF'\n{HOLD}EOF")
    p = subprocess.Popen(
        ["ssh", "-F", args.ssh_config, "-o", "LogLevel=ERROR", "node1",
         "sudo sh -c " + shlex.quote(in_workload("node1", "python3 -u /tmp/hold.py"))],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip

    def rt(n: int) -> str:
        p.stdin.write(f"{n}\n")
        p.stdin.flush()
        return p.stdout.readline().strip()

    check("held connection node1 -> node2 (HBONE)", rt(1000) == "ok 1000", "1000 bytes echoed")
    before = {vm: ssh(vm, "systemctl show -p MainPID --value dabba-tunnel").stdout.strip()
              for vm in NODES}  # fmt: skip
    for vm in NODES:
        ssh(vm, "systemctl restart dabba-agent", timeout=300)
    check("after systemctl restart dabba-agent on both nodes", rt(2000) == "ok 3000",
          "2000 more bytes echoed on the same connection")  # fmt: skip
    for vm in NODES:
        ssh(vm, "systemctl stop dabba-agent")
    check("while dabba-agent is stopped on both nodes", rt(3000) == "ok 6000",
          "3000 more bytes echoed")  # fmt: skip
    r = ssh("node1", in_workload("node1", "socat -t 10 - TCP:10.20.2.11:9000 < /tmp/req | wc -c"))
    check("a new connection while the agents are stopped", r.stdout.strip() == "3333", r.stdout)
    for vm in NODES:
        ssh(vm, "systemctl start dabba-agent", timeout=300)
    check("after systemctl start dabba-agent", rt(4000) == "ok 10000", "4000 more bytes echoed")
    after = {vm: ssh(vm, "systemctl show -p MainPID --value dabba-tunnel").stdout.strip()
             for vm in NODES}  # fmt: skip
    check("the tunnels were never restarted", before == after, after)
    p.stdin.close()
    p.wait(30)
    fs = wait(lambda: [f for f in flows("node1", "--port", "9002", "--state", "closed")], 30,
              "the held flow's record")  # fmt: skip
    f = fs[0]
    check(
        "node1: dabba flows shows the held flow whole, with identities, after the restarts",
        (f["bytes_to_dst"], f["bytes_to_src"], f["path"], f["dst"]["identity"])
        == (10000, 10000, "hbone", spiffe("server")),
        {k: f[k] for k in ("bytes_to_dst", "bytes_to_src", "path")} | {"dst": f["dst"]["identity"]},
    )


def dabba_programs(vm: str, lsm_id: int | None = None) -> list[str]:
    """Names of dabba's programs in the kernel; family.c's LSM program (named after its hook
    by bcc) is found by its id (lsm_id, read from its pin) and listed as lsm/socket_create."""
    progs = json.loads(ssh(vm, "bpftool -j prog show").stdout)
    return sorted(
        "lsm/socket_create" if p.get("id") == lsm_id else p.get("name", "")
        for p in progs
        if p.get("name", "").startswith("dabba_") or p.get("id") == lsm_id
    )


def lsm_program_id(vm: str) -> int | None:
    r = ssh(vm, "bpftool -j prog show pinned /sys/fs/bpf/dabba/*/progs/lsm__socket_create",
            check=False)  # fmt: skip
    return json.loads(r.stdout).get("id") if r.returncode == 0 and r.stdout.strip() else None


def uninstall_cleanly() -> None:
    """`dabba uninstall systemd` on node1: units gone, programs detached and unpinned."""
    vm = "node1"
    lsm_id = lsm_program_id(vm)
    before = dabba_programs(vm, lsm_id)
    check(f"{vm}: dabba's programs loaded before uninstall, the LSM one too",
          len(before) >= 5 and "lsm/socket_create" in before, before)  # fmt: skip
    out = ssh(vm, "dabba uninstall systemd", timeout=180).stdout
    log(f"{vm}: dabba uninstall systemd said: {out.strip()}")
    r = ssh(vm, "systemctl list-unit-files 'dabba-*' --no-legend; ls /etc/systemd/system")
    check(f"{vm}: no dabba unit is left", "dabba-" not in r.stdout, r.stdout.split())
    r = ssh(vm, "find /sys/fs/bpf -path '*dabba*'", check=False)
    check(f"{vm}: nothing pinned under /sys/fs/bpf/dabba", r.stdout.strip() == "", r.stdout.split())
    r = ssh(vm, "bpftool -j cgroup tree /sys/fs/cgroup")
    attached = [
        {"cgroup": c.get("cgroup"), "programs": [p.get("name") for p in c.get("programs", [])]}
        for c in json.loads(r.stdout or "[]")
        if any(p.get("name", "").startswith("dabba_") for p in c.get("programs", []))
    ]  # fmt: skip
    check(f"{vm}: no dabba program attached to any cgroup", attached == [], attached)
    # the kernel frees a program once its last link, pin and descriptor are gone (after RCU)
    left = wait(lambda: dabba_programs(vm, lsm_id) == [] or None, 30,
                "the kernel to free the programs")  # fmt: skip
    check(f"{vm}: no dabba program left in the kernel", left, dabba_programs(vm, lsm_id))
    r = ssh(vm, "test -f /etc/dabba/agent.yaml && test -d /var/lib/dabba && echo kept")
    check(f"{vm}: config and state kept without --purge", r.stdout.strip() == "kept", r.stdout)


def main() -> None:
    global args
    ap = argparse.ArgumentParser()
    ap.add_argument("--ssh-config", required=True)
    ap.add_argument("--netns", required=True)
    ap.add_argument("--box-kernel", default="")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.monotonic()
    try:
        for step in (units_and_probe, workloads, hbone_bytes_and_no_plaintext, policy_deny,
                     packet_sockets_refused, restart_keeps_connections,
                     uninstall_cleanly):  # fmt: skip
            log(f"--- {step.__name__}")
            step()
    finally:
        report["seconds"] = round(time.monotonic() - t0, 1)
        report["guest_kernel"] = args.box_kernel
        for vm in ("control", *NODES):
            r = ssh(vm, "journalctl -u 'dabba-*' --no-pager -n 200", check=False)
            with open(os.path.join(args.out, f"journal-{vm}.txt"), "w") as f:
                f.write(r.stdout)
        with open(os.path.join(args.out, "report.json"), "w") as f:
            json.dump(report, f, indent=1)
    log(f"all {len(report['checks'])} checks passed in {report['seconds']}s")


if __name__ == "__main__":
    sys.exit(main())
