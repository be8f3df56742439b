"""Names of every map and program, as the C declares them (include/maps.h).

One place for the names user space uses; the kernel keeps 15 characters of
a name, and every one here fits.
"""

from __future__ import annotations

PREFIX = "dabba_"

# maps (include/maps.h)
MAP_CFG = "dabba_cfg"
MAP_WORKLOADS = "dabba_wl"
MAP_EXCL_NET = "dabba_excl_net"
MAP_EXCL_PORT = "dabba_excl_port"
MAP_CAP_COOKIE = "dabba_cap_ck"
MAP_CAP_TUPLE = "dabba_cap_tp"
MAP_FLOWS = "dabba_flows"
MAP_FLOW_EVENTS = "dabba_flow_ev"
MAP_STATS = "dabba_stats"
MAP_TUNNEL_ADDRS = "dabba_tun_addr"
MAP_GUARD_COUNT = "dabba_guard_ct"
MAP_PLAIN = "dabba_plain"
MAP_SK_OWNER = "dabba_sk_owner"
MAP_NODE_IPS = "dabba_node_ip"
MAP_MESH_PORTS = "dabba_mesh_port"
MAP_TUN_SK = "dabba_tun_sk"
MAP_PORT_MTLS = "dabba_port_mtls"
MAP_TUN_CONN = "dabba_tun_conn"
MAP_CAP_OPEN = "dabba_cap_open"
MAP_WL_OPEN = "dabba_wl_open"
MAP_VERDICT = "dabba_verdicts"
MAP_DIRECT = "dabba_direct"
MAP_DIRECT_COOKIE = "dabba_direct_ck"
MAP_SVC = "dabba_svc"
MAP_SVC_EP = "dabba_svc_ep"
MAP_LB_EP = "dabba_lb_ep"
MAP_SK_PEER = "dabba_sk_peer"

ALL_MAPS = (
    MAP_CFG,
    MAP_WORKLOADS,
    MAP_EXCL_NET,
    MAP_EXCL_PORT,
    MAP_CAP_COOKIE,
    MAP_CAP_TUPLE,
    MAP_FLOWS,
    MAP_FLOW_EVENTS,
    MAP_STATS,
    MAP_TUNNEL_ADDRS,
    MAP_GUARD_COUNT,
    MAP_PLAIN,
    MAP_SK_OWNER,
    MAP_NODE_IPS,
    MAP_MESH_PORTS,
    MAP_TUN_SK,
    MAP_PORT_MTLS,
    MAP_TUN_CONN,
    MAP_CAP_OPEN,
    MAP_WL_OPEN,
    MAP_VERDICT,
    MAP_DIRECT,
    MAP_DIRECT_COOKIE,
    MAP_SVC,
    MAP_SVC_EP,
    MAP_LB_EP,
    MAP_SK_PEER,
)

# programs (function names in the .c files)
PROG_SOCK_CREATE = "dabba_sock_new"
PROG_SOCK_RELEASE = "dabba_sock_gone"
PROG_CONNECT4 = "dabba_connect4"
PROG_CONNECT6 = "dabba_connect6"
PROG_SENDMSG4 = "dabba_sendmsg4"
PROG_SENDMSG6 = "dabba_sendmsg6"
PROG_SOCKOPS = "dabba_sockops"
PROG_GUARD = "dabba_guard"
PROG_PLAIN = "dabba_plain_in"
PROG_OWN = "dabba_own_in"
PROG_TUN_OPS = "dabba_tun_ops"
PROG_PEER4 = "dabba_peer4"
PROG_PEER6 = "dabba_peer6"
# bcc names an LSM program lsm__<hook> and finds the hook by that name (family.c);
# the kernel keeps "lsm__socket_cre", the pin keeps the whole name.
PROG_FAMILY = "lsm__socket_create"

for _n in ALL_MAPS + (
    PROG_SOCK_CREATE,
    PROG_SOCK_RELEASE,
    PROG_CONNECT4,
    PROG_CONNECT6,
    PROG_SENDMSG4,
    PROG_SENDMSG6,
    PROG_SOCKOPS,
    PROG_GUARD,
    PROG_PLAIN,
    PROG_OWN,
    PROG_TUN_OPS,
    PROG_PEER4,
    PROG_PEER6,
):
    assert len(_n) <= 15 and _n.startswith(PREFIX), _n
