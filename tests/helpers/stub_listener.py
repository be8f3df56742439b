"""A stub of the tunnel's outbound listener (15001), for the capture test.

Accepts --count connections; for each, recovers the original destination
and the source cgroup id from the pinned capture map -- without bcc -- and
answers with an HTTP response naming them. Prints one JSON line per
connection, then whether bcc was ever imported.
"""

import argparse
import json
import socket
import sys

sys.path.insert(0, sys.argv[sys.argv.index("--repo") + 1])

from agent.bpf.capture import CaptureReader  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo")
    ap.add_argument("--maps", required=True)
    ap.add_argument("--listen", required=True)
    ap.add_argument("--count", type=int, default=1)
    ap.add_argument(
        "--register", action="store_true", help="be the tunnel's socket for own.c (dabba_tun_sk)"
    )
    a = ap.parse_args()
    reader = CaptureReader(a.maps)
    host, port = a.listen.rsplit(":", 1)
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind((host, int(port)))
    ls.listen(16)
    if a.register:
        from agent.ztunnel.listeners import register

        register(a.maps, [ls, ls])
    host, port = ls.getsockname()[:2]
    print(json.dumps({"listening": f"{host}:{port}"}), flush=True)
    for _ in range(a.count):
        s, peer = ls.accept()
        cap = reader.lookup_socket(s)
        rec = {"peer": list(peer), "found": cap is not None}
        if cap:
            rec.update(orig_ip=cap.orig_ip, orig_port=cap.orig_port, cgroup_id=cap.cgroup_id)
        s.recv(65536)
        body = json.dumps(rec).encode()
        s.sendall(
            b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
            % (len(body), body)
        )
        s.close()
        print(json.dumps(rec), flush=True)
    print(json.dumps({"bcc_imported": "bcc" in sys.modules}), flush=True)


if __name__ == "__main__":
    main()
