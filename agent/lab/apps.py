"""Real applications for the lab's pods: nginx (Debian's nginx-light) with a fixed-size response."""

from __future__ import annotations

import os
import subprocess

from .lab import Lab


def nginx_conf(
    workdir: str,
    ip: str,
    port: int,
    body_bytes: int = 1024,
    files: str | None = None,
    text: str | None = None,
) -> str:
    """An nginx config serving `body_bytes` of 'x' (or text) at / on ip:port (and the folder
    `files` at /files/), everything under workdir."""
    os.makedirs(workdir, exist_ok=True)
    body = text if text is not None else "x" * body_bytes
    static = f"location /files/ {{ alias {files.rstrip('/')}/; }}" if files else ""
    conf = os.path.join(workdir, "nginx.conf")
    with open(conf, "w") as f:
        f.write(
            f"""user root;  # the lab's files live in root-only folders
worker_processes 1;
worker_rlimit_nofile 20000;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 16384; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    keepalive_requests 1000000;
    keepalive_timeout 120s;
    server {{
        listen {ip}:{port} backlog=4096;
        location / {{ default_type text/plain; return 200 "{body}"; }}
        {static}
    }}
}}
"""
        )
    return conf


def start_nginx(
    lab: Lab,
    pod: str,
    port: int,
    workdir: str,
    body_bytes: int = 1024,
    files: str | None = None,
    text: str | None = None,
):
    """nginx in the pod's network namespace, in the foreground (the caller stops it)."""
    p = lab.pod(pod)
    conf = nginx_conf(workdir, p.ip, port, body_bytes, files, text)
    return lab.popen(
        pod,
        ["nginx", "-c", conf, "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


# An HTTP/1.1 server whose answers a test chooses by path, for L7 behaviour through waypoints:
# /half fails every other request with 503, /slow answers after 1 s, /sick answers 503 when
# the server was started sick, /headers answers the request's headers (JSON); anything else
# 200. The body names the pod.
HTTP_APP = r"""
import json, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
ip, port, name, sick = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "sick"
lock, n = threading.Lock(), [0]
class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def log_message(self, *a):
        pass
    def do_GET(self):
        if self.headers.get("Content-Length"):
            self.rfile.read(int(self.headers["Content-Length"]))
        code, path = 200, self.path.split("?")[0]
        if path == "/half":
            with lock:
                n[0] += 1
                code = 503 if n[0] % 2 else 200
        elif path == "/slow":
            time.sleep(1.0)
        elif path == "/sick" and sick:
            code = 503
        body = (name + "\n").encode()
        if path == "/headers":
            body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    do_POST = do_GET
ThreadingHTTPServer.daemon_threads = True
ThreadingHTTPServer((ip, port), H).serve_forever()
"""


def start_http_app(lab: Lab, pod: str, port: int, sick: bool = False):
    """HTTP_APP in the pod on its address and port (the caller stops it)."""
    p = lab.pod(pod)
    return lab.popen(
        pod,
        ["python3", "-c", HTTP_APP, p.ip, str(port), pod, "sick" if sick else "well"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
