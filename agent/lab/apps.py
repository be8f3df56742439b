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
