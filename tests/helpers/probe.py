"""Try ways out of (or into) a workload, as an attacker would; print one JSON result per try.

    probe.py TRIES_JSON

TRIES_JSON: a list of {"op": "tcp"|"udp_sendto"|"udp_connect"|"socket", "host": str,
"port": int, "family": 4|6, "send": str, "timeout": float, "type": "raw"|"ping"|...}.
Each result is "connected <first bytes of the answer>", "sent", "created", or
"error <errno name>" (EPERM: refused by the mesh in the kernel), "timeout".
"""

import errno
import json
import socket
import sys


def _err(e: OSError) -> str:
    if isinstance(e, TimeoutError):  # socket.timeout is TimeoutError
        return "timeout"
    return f"error {errno.errorcode.get(e.errno, e.errno)}"


def _addr(t):
    host = t["host"]
    if t.get("family", 4) == 6:
        info = socket.getaddrinfo(host, t["port"], socket.AF_INET6)[0][4]  # scope ids (%eth0)
        return socket.AF_INET6, info
    return socket.AF_INET, (host, t["port"])


def one(t: dict) -> str:
    op, timeout = t["op"], t.get("timeout", 3.0)
    try:
        if op == "socket":
            kind = {
                "raw": (socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                "ping": (socket.AF_INET, socket.SOCK_DGRAM, socket.IPPROTO_ICMP),
                "sctp": (socket.AF_INET, socket.SOCK_STREAM, 132),
                "udplite": (socket.AF_INET, socket.SOCK_DGRAM, 136),
                "raw6": (socket.AF_INET6, socket.SOCK_RAW, socket.IPPROTO_ICMPV6),
                # frames of its own: no cgroup hook sees these (bpf/family.c does)
                "packet": (socket.AF_PACKET, socket.SOCK_RAW, 0),
                "packet_dgram": (socket.AF_PACKET, socket.SOCK_DGRAM, 0),
                "sock_packet": (
                    socket.AF_INET,
                    10,
                    0,
                ),  # SOCK_PACKET: the kernel makes it AF_PACKET
                "unix": (socket.AF_UNIX, socket.SOCK_STREAM, 0),
                "netlink": (socket.AF_NETLINK, socket.SOCK_RAW, 0),
            }[t["type"]]
            socket.socket(*kind).close()
            return "created"
        fam, addr = _addr(t)
        if op == "tcp":
            with socket.socket(fam, socket.SOCK_STREAM) as s:
                s.settimeout(timeout)
                s.connect(addr)
                if t.get("send"):
                    s.sendall(t["send"].encode())
                    return "connected " + s.recv(200).decode(errors="replace")
                return "connected"
        with socket.socket(fam, socket.SOCK_DGRAM) as s:
            s.settimeout(timeout)
            if op == "udp_connect":
                s.connect(addr)
                s.send(t.get("send", "x").encode())
            else:
                s.sendto(t.get("send", "x").encode(), addr)
            return "sent"
    except OSError as e:
        return _err(e)


def main() -> None:
    for t in json.loads(sys.argv[1]):
        print(json.dumps({"try": t, "result": one(t)}), flush=True)


if __name__ == "__main__":
    main()
