"""A client of a service VIP, driven line by line on stdin; answers one JSON line each.

open N hold|close   connect N times; each: the endpoint's name (its first line), the peer
                    getpeername() gives, or the connect's errno. hold keeps the sockets.
close NAME          reset one held connection to NAME (SO_LINGER 0: closed at once)
"""

import json
import socket
import struct
import sys

vip, port = sys.argv[1], int(sys.argv[2])
held: dict[str, list[socket.socket]] = {}
for line in sys.stdin:
    cmd = line.split()
    out = []
    if cmd[0] == "open":
        for _ in range(int(cmd[1])):
            s = socket.socket(socket.AF_INET6 if ":" in vip else socket.AF_INET)
            s.settimeout(5)
            try:
                s.connect((vip, port))
                peer = list(s.getpeername()[:2])
                name = s.recv(100).decode().strip()
            except OSError as e:
                out.append({"errno": e.errno})
                s.close()
                continue
            out.append({"name": name, "peer": peer})
            if cmd[2] == "hold":
                held.setdefault(name, []).append(s)
            else:
                s.close()
    elif cmd[0] == "close":
        s = held[cmd[1]].pop()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    print(json.dumps(out), flush=True)
