"""Node attestation in Kubernetes: a node joins with its agent pod's ServiceAccount token.

Instead of one-time join tokens (which a DaemonSet can only hand out by mounting every node's
token in every node's pod), the agent sends the token the kubelet projects into its pod
(audience ``dabbawala-join``, minutes long). The control plane asks the API server who that is
(TokenReview) and accepts the join only when:

- the token is valid for our audience;
- it belongs to the agent's ServiceAccount (``--join-service-account``, by default
  ``dabbawala-system/dabba-agent``);
- the pod it is bound to runs on the node that asks to join: the token's node claim
  (``authentication.kubernetes.io/node-name``, Kubernetes 1.30+), or else the bound pod, read
  from the API (same UID, ``spec.nodeName``).

So a compromised node can join as itself only. A token is not used up by a join (the kubelet
renews it); it lives minutes, and the node is then known by its certificate.
"""

from __future__ import annotations

from ..errors import DabbaError
from .tokens import TokenError

AUDIENCE = "dabbawala-join"
NODE_NAME = "authentication.kubernetes.io/node-name"
POD_NAME = "authentication.kubernetes.io/pod-name"
POD_UID = "authentication.kubernetes.io/pod-uid"


def looks_like_jwt(token: str) -> bool:
    """A ServiceAccount token (header.payload.signature), not an <id>.<secret> join token."""
    parts = token.split(".")
    return len(parts) == 3 and token.startswith("eyJ") and all(parts)


class KubeAttestor:
    """Checks a join's ServiceAccount token with the API server (the real client)."""

    def __init__(self, service_account: str, kubeconfig: str | None = None):
        ns, _, name = service_account.partition("/")
        if not ns or not name:
            raise DabbaError(
                f"--join-service-account {service_account!r} is not NAMESPACE/NAME",
                hint="by default dabbawala-system/dabba-agent (deploy/kubernetes)",
            )
        self.namespace, self.name = ns, name
        self.username = f"system:serviceaccount:{ns}:{name}"
        try:
            from kubernetes import client, config
        except ImportError as e:
            raise DabbaError(f"the kubernetes client is not installed: {e}") from None
        if kubeconfig:
            config.load_kube_config(kubeconfig)
        else:
            config.load_incluster_config()
        self.client = client
        self.auth = client.AuthenticationV1Api()
        self.core = client.CoreV1Api()

    def check(self, token: str, node: str) -> None:
        """Raise TokenError unless token proves an agent pod running on node."""
        c = self.client
        try:
            review = self.auth.create_token_review(
                c.V1TokenReview(spec=c.V1TokenReviewSpec(token=token, audiences=[AUDIENCE]))
            )
        except Exception as e:  # the API server's answer, or none
            raise TokenError(f"the API server could not review the token: {_short(e)}") from None
        st = review.status
        if not st or not st.authenticated:
            why = (st.error if st else "") or "not authenticated"
            raise TokenError(f"ServiceAccount token refused by the API server: {why}")
        if AUDIENCE not in (st.audiences or []):
            raise TokenError(f"the token is not for audience {AUDIENCE}")
        user = st.user
        if user is None or user.username != self.username:
            raise TokenError(
                f"the token is {getattr(user, 'username', None)!r}'s, not the agent's "
                f"({self.username})"
            )
        extra = user.extra or {}
        claimed = (extra.get(NODE_NAME) or [None])[0]
        if claimed is None:  # a cluster before 1.30: the bound pod says where it runs
            claimed = self._pod_node(extra)
        if claimed != node:
            raise TokenError(f"the token's pod runs on node {claimed!r}, not {node!r}")

    def _pod_node(self, extra: dict) -> str | None:
        name = (extra.get(POD_NAME) or [None])[0]
        uid = (extra.get(POD_UID) or [None])[0]
        if not name or not uid:
            raise TokenError(
                "the token is bound to no pod (a bound ServiceAccount token is needed)"
            )
        try:
            pod = self.core.read_namespaced_pod(name, self.namespace)
        except Exception as e:
            raise TokenError(f"the token's pod {name} cannot be read: {_short(e)}") from None
        if pod.metadata.uid != uid:
            raise TokenError(f"the token's pod {name} is gone (another pod has its name)")
        return pod.spec.node_name


def _short(e: Exception) -> str:
    status = getattr(e, "status", None)
    reason = getattr(e, "reason", None)
    if status:
        return f"{status} {reason}"
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__
