// SPDX-License-Identifier: GPL-2.0
/*
 * Owner tag: cgroup/sock_create.
 *
 * Runs in the creating process's context, the one place where the
 * workload's cgroup is known for every socket it will own, including the
 * listeners whose accepted sockets inherit the tag (BPF_F_CLONE). sockops
 * (sockops.c) accounts only sockets carrying the tag. It also refuses the
 * inet sockets that have no path through the mesh.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/net.h>
#include <linux/socket.h>

#include "workload.h"

/* include/workload.h: bcc rewrites map calls in this file only */
static __always_inline struct dabba_workload *dabba_wl_get(u64 *id)
{
	return dabba_wl.lookup(id);
}

/*
 * Other inet sockets of a capturing workload -- raw, ICMP ping, SCTP,
 * UDP-Lite -- have no path through the mesh: refused at socket() (EPERM)
 * and counted, unless the node's config lets non-TCP pass. UDP is decided
 * per destination (connect.c: only DNS leaves).
 */
static __always_inline int other_protocol_allowed(struct bpf_sock *sk, struct dabba_workload *wl)
{
	if (sk->protocol == IPPROTO_TCP || sk->protocol == IPPROTO_UDP)
		return 1;
	if (!(wl->flags & DABBA_WL_CAPTURE))
		return 1;
	u32 zero = 0;
	struct dabba_config *cfg = dabba_cfg.lookup(&zero);
	if (!cfg || !cfg->enabled || (cfg->flags & DABBA_CFG_PASS_NON_TCP))
		return 1;
	u32 stat = DABBA_ST_PROTO_REFUSED;
	u64 *v = dabba_stats.lookup(&stat);
	if (v)
		*v += 1;
	return 0;
}

int dabba_sock_new(struct bpf_sock *sk)
{
	if (sk->family != AF_INET && sk->family != AF_INET6)
		return 1;

	u64 cg = 0;
	struct dabba_workload *wl = dabba_current_workload(&cg);
	if (!wl)
		return 1;
	if (!other_protocol_allowed(sk, wl))
		return 0;
	if (sk->protocol != IPPROTO_TCP || !(wl->flags & DABBA_WL_ACCOUNT))
		return 1;

	/* AF_INET6 too: such a socket reaches IPv4 through mapped addresses (sockops.c) */
	struct dabba_sk_owner *own =
	    dabba_sk_owner.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (own)
		own->cgroup_id = cg;
	return 1;
}

/*
 * cgroup/sock_release: the socket of an enrolled workload is gone (its last descriptor
 * closed). Its captured-connection slot is given back (connect.c, max_open), and a capture
 * record that no connection ever took -- connect() failed after the capture, say on an
 * IPV6_V6ONLY socket -- is removed: before, each such socket left one in dabba_cap_ck for
 * good, and a workload could fill the map and refuse every capture on the node.
 */
int dabba_sock_gone(struct bpf_sock *sk)
{
	if (sk->family != AF_INET && sk->family != AF_INET6)
		return 1;
	u64 cookie = bpf_get_socket_cookie(sk);
	dabba_cap_ck.delete(&cookie);
	dabba_direct_ck.delete(&cookie); /* a direct connect() that never reached the SYN */
	u64 *cg = dabba_cap_open.lookup(&cookie);
	if (!cg)
		return 1;
	u64 owner = *cg;
	if (dabba_cap_open.delete(&cookie) != 0)
		return 1; /* another CPU gave it back */
	u64 *n = dabba_wl_open.lookup(&owner);
	if (n && *n > 0)
		__sync_fetch_and_sub(n, 1);
	return 1;
}
