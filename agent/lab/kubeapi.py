"""A Kubernetes API-server stand-in: list endpoints over real HTTP, for the real client.

No API server can be installed on the machines this project is built and tested on, so this
stands in for one, and only for what the control plane's Kubernetes source calls: the cluster
lists of Pods, Services, EndpointSlices and Istio's AuthorizationPolicy and PeerAuthentication,
with objects in the API's JSON shape (tests/data/k8s/objects.json). Each list can be made to
fail with a status (500, 429, 403...) or to answer 404 as when a CRD is not installed.

In a process of its own (the lab's Kubernetes mode, `mesh.up(source="kubernetes")`)::

    python -m agent.lab.kubeapi --listen IP:PORT --objects FILE.json

serves FILE.json ({"pods": [...], "authorizationpolicies": [...], ...}), read again whenever
it changes, so a test changes the cluster by rewriting the file.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

PATHS = {
    "/api/v1/pods": ("PodList", "pods"),
    "/api/v1/services": ("ServiceList", "services"),
    "/api/v1/namespaces": ("NamespaceList", "namespaces"),
    "/apis/discovery.k8s.io/v1/endpointslices": ("EndpointSliceList", "endpointslices"),
    "/apis/security.istio.io/v1/authorizationpolicies": ("List", "authorizationpolicies"),
    "/apis/security.istio.io/v1/peerauthentications": ("List", "peerauthentications"),
    "/apis/security.istio.io/v1beta1/authorizationpolicies": ("List", "authorizationpolicies"),
    "/apis/security.istio.io/v1beta1/peerauthentications": ("List", "peerauthentications"),
    # waypoints' routing (only v1 is served here: the source falls back to v1beta1 on a 404)
    "/apis/gateway.networking.k8s.io/v1/gateways": ("List", "gateways"),
    "/apis/gateway.networking.k8s.io/v1/httproutes": ("List", "httproutes"),
    "/apis/networking.istio.io/v1/virtualservices": ("List", "virtualservices"),
    "/apis/networking.istio.io/v1/destinationrules": ("List", "destinationrules"),
}


class KubeAPI:
    """objects: {"pods": [...], ...} or a callable returning it (read per request);
    fail: {url path: HTTP status} answered instead."""

    def __init__(self, objects, host: str = "127.0.0.1", port: int = 0):
        self.objects = objects
        self.fail: dict[str, int] = {}
        self.requests: list[str] = []
        api = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def _send(self, status: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self):
                """TokenReview: objects["tokenreviews"] maps a token to its user (username,
                audiences, extra); any other token is not authenticated."""
                path = self.path.split("?", 1)[0]
                api.requests.append(f"POST {path}")
                if path != "/apis/authentication.k8s.io/v1/tokenreviews":
                    return self._send(404, {"kind": "Status", "code": 404})
                review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                objs = api.objects() if callable(api.objects) else api.objects
                who = objs.get("tokenreviews", {}).get(review["spec"]["token"])
                wanted = review["spec"].get("audiences") or []
                if who is None or not set(wanted) <= set(who.get("audiences", [])):
                    status = {"authenticated": False, "error": "invalid bearer token"}
                else:
                    status = {
                        "authenticated": True,
                        "audiences": wanted,
                        "user": {"username": who["username"], "extra": who.get("extra", {})},
                    }
                self._send(201, {**review, "status": status})

            def do_GET(self):
                path = self.path.split("?", 1)[0]
                api.requests.append(path)
                parts = path.strip("/").split("/")
                if (
                    len(parts) == 6
                    and parts[:3] == ["api", "v1", "namespaces"]
                    and parts[4] == "pods"
                ):
                    objs = api.objects() if callable(api.objects) else api.objects
                    pod = next((p for p in objs.get("pods", [])
                                if p["metadata"]["name"] == parts[5]
                                and p["metadata"].get("namespace") == parts[3]), None)  # fmt: skip
                    return self._send(200, pod) if pod else self._send(404, {"code": 404})
                if path in api.fail:
                    status = api.fail[path]
                    body = {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                            "code": status, "reason": "StandIn", "message": "made to fail"}  # fmt: skip
                elif path in PATHS:
                    kind, key = PATHS[path]
                    status = 200
                    objs = api.objects() if callable(api.objects) else api.objects
                    body = {"kind": kind, "apiVersion": "v1", "metadata": {},
                            "items": objs.get(key, [])}  # fmt: skip
                else:
                    status = 404
                    body = {"kind": "Status", "code": 404, "message": f"{path} not found"}
                self._send(status, body)

        self.server = ThreadingHTTPServer((host, port), Handler)
        self.url = f"http://{host}:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def kubeconfig(self, path: str) -> str:
        return kubeconfig_for(self.url, path)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def kubeconfig_for(url: str, path: str) -> str:
    """A kubeconfig file for the stand-in at url (no credentials: it asks for none)."""
    cfg = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "standin", "cluster": {"server": url}}],
        "users": [{"name": "standin", "user": {}}],
        "contexts": [{"name": "standin", "context": {"cluster": "standin", "user": "standin"}}],
        "current-context": "standin",
    }
    with open(path, "w") as f:
        json.dump(cfg, f)
    return path


def main() -> None:
    import argparse
    import os

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--listen", required=True, help="IP:PORT")
    ap.add_argument("--objects", required=True, help="a JSON file, read again when it changes")
    a = ap.parse_args()
    cache: dict = {"stamp": None, "objects": {}}

    def objects() -> dict:
        st = os.stat(a.objects)
        if (st.st_mtime_ns, st.st_size) != cache["stamp"]:
            with open(a.objects) as f:
                cache["objects"] = json.load(f)
            cache["stamp"] = (st.st_mtime_ns, st.st_size)
        return cache["objects"]

    host, _, port = a.listen.rpartition(":")
    api = KubeAPI(objects, host, int(port))
    print(f"serving {api.url}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
