// SPDX-License-Identifier: GPL-2.0
/*
 * The tunnel's own connections: sockops on the tunnel's cgroup.
 *
 * The ingress guard (guard.c) and the plaintext steering (plain.c) let a
 * connection to a workload through as the tunnel's when it comes from a
 * tunnel address. On a host install that address is the node's own, which
 * every host process, host-network pod and masqueraded NodePort connection
 * shares: the address alone proves nothing. So the tunnel's connections are
 * recorded here, by their 4-tuple, before their SYN leaves: this program is
 * attached to the tunnel's cgroup only (the agent attaches it; see
 * DatapathControl.trust_tunnel_cgroup), and the guard and the steering admit
 * a tunnel address only for a recorded 4-tuple. The record goes when the
 * connection closes (and an LRU map never fills up with stale ones).
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>

#include "maps.h"

int dabba_tun_ops(struct bpf_sock_ops *skops)
{
	struct dabba_tuple t = {};
	if (skops->family == AF_INET) {
		t.src_ip = dabba_v4(skops->local_ip4);
		t.dst_ip = dabba_v4(skops->remote_ip4);
	} else if (skops->family == AF_INET6) {
		t.src_ip = DABBA_CTX_IP6(skops->local_ip6);
		t.dst_ip = DABBA_CTX_IP6(skops->remote_ip6);
	} else {
		return 1;
	}
	t.src_port = (u16)skops->local_port;
	t.dst_port = bpf_ntohl(skops->remote_port);
	u8 one = 1;
	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		if (!dabba_tun_addr.lookup(&t.src_ip))
			break; /* not from a tunnel address: nothing to vouch for */
		dabba_tun_conn.update(&t, &one);
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_STATE_CB:
		if (skops->args[1] == BPF_TCP_CLOSE)
			dabba_tun_conn.delete(&t);
		break;
	}
	return 1;
}
