"""Byte-exact TCP transfers for tests, run inside lab pods.

  xfer.py server --listen IP:PORT [--send N] [--duplex N] [--reset]
  xfer.py client --connect IP:PORT [--send N] [--duplex N] [--stream]

Plain mode: the client sends --send bytes and shuts down writing; the
server reads to EOF, then sends its --send bytes and closes; the client
reads to EOF. Duplex mode: both sides send N random bytes while reading.
--stream: the client sends 64 KiB every 20 ms until stdin closes.
Each side prints one JSON line: bytes and sha256 sent and received.
"""

import argparse
import hashlib
import json
import os
import socket
import struct
import sys
import threading
import time

CHUNK = 1 << 20


def send_n(sock, n, digest):
    left = n
    while left:
        b = os.urandom(min(CHUNK, left))
        sock.sendall(b)
        digest.update(b)
        left -= len(b)


def recv_all(sock, digest):
    n = 0
    while True:
        b = sock.recv(CHUNK)
        if not b:
            return n
        digest.update(b)
        n += len(b)


def exchange(sock, args, server):
    hs, hr = hashlib.sha256(), hashlib.sha256()
    out = {"sent": 0, "received": 0, "local": sock.getsockname(), "peer": sock.getpeername()}
    if args.duplex is not None:

        def tx():
            send_n(sock, args.duplex, hs)
            sock.shutdown(socket.SHUT_WR)

        t = threading.Thread(target=tx)
        t.start()
        out["received"] = recv_all(sock, hr)
        t.join()
        out["sent"] = args.duplex
    elif args.stream:
        stop = threading.Event()
        threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
        chunk = os.urandom(65536)
        while not stop.is_set():
            sock.sendall(chunk)
            hs.update(chunk)
            out["sent"] += len(chunk)
            time.sleep(0.02)
        sock.shutdown(socket.SHUT_WR)
        out["received"] = recv_all(sock, hr)
    elif server:
        out["received"] = recv_all(sock, hr)
        if args.reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:
            send_n(sock, args.send, hs)
            out["sent"] = args.send
    else:
        send_n(sock, args.send, hs)
        out["sent"] = args.send
        if not args.hold:
            sock.shutdown(socket.SHUT_WR)
        try:
            out["received"] = recv_all(sock, hr)
        except ConnectionResetError:
            out["reset"] = True
    out["sha_sent"], out["sha_received"] = hs.hexdigest(), hr.hexdigest()
    sock.close()
    return out


def addr(s):
    """IP:PORT or [IPv6]:PORT."""
    host, port = s.rsplit(":", 1)
    return host.strip("[]"), int(port)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("role", choices=["server", "client"])
    ap.add_argument("--listen")
    ap.add_argument("--connect")
    ap.add_argument("--send", type=int, default=0)
    ap.add_argument("--duplex", type=int)
    ap.add_argument("--stream", action="store_true")
    ap.add_argument("--hold", action="store_true", help="client: do not half-close after sending")
    ap.add_argument("--reset", action="store_true", help="server: reset instead of replying")
    ap.add_argument("--reset-after", type=float, help="server: wait, then reset")
    args = ap.parse_args()
    if args.role == "server":
        ls = socket.socket(socket.AF_INET6 if ":" in addr(args.listen)[0] else socket.AF_INET)
        ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        ls.bind(addr(args.listen))
        ls.listen(16)
        print(json.dumps({"listening": args.listen}), flush=True)
        s, _ = ls.accept()
        if args.reset_after is not None:
            time.sleep(args.reset_after)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()
            print(json.dumps({"reset": True}), flush=True)
            return
        print(json.dumps(exchange(s, args, True)), flush=True)
    else:
        s = socket.create_connection(addr(args.connect), timeout=30)
        s.settimeout(120)
        print(json.dumps(exchange(s, args, False)), flush=True)


if __name__ == "__main__":
    main()
