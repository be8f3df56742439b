// SPDX-License-Identifier: GPL-2.0
/*
 * Capture: cgroup/connect4.
 *
 * For enrolled workloads, rewrite connect() to the node tunnel's outbound
 * listener and remember where the workload wanted to go, together with the
 * caller's cgroup id (a kernel-attested source identity the workload cannot
 * forge), keyed by socket cookie. sockops (sockops.c) moves the record under
 * the 4-tuple the tunnel sees once the connection is established.
 *
 * Never touched: workloads that are not enrolled, the tunnel's own sockets
 * (its cgroup is not enrolled, and its sockets carry tunnel_mark), and
 * destinations excluded by CIDR or port.
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

/* Count n events of kind stat in dabba_stats (see include/maps.h). */
static __always_inline void count(u32 stat, u64 n)
{
	u64 *v = dabba_stats.lookup(&stat);
	if (v)
		*v += n;
}

int dabba_connect4(struct bpf_sock_addr *ctx)
{
	if (ctx->type != SOCK_STREAM || ctx->family != AF_INET)
		return 1;

	u64 cg = 0;
	struct dabba_workload *wl = dabba_current_workload(&cg);
	if (!wl || !(wl->flags & DABBA_WL_CAPTURE))
		return 1;

	u32 zero = 0;
	struct dabba_config *cfg = dabba_cfg.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return 1;

	struct bpf_sock *sk = ctx->sk;
	if (sk && cfg->tunnel_mark && sk->mark == cfg->tunnel_mark)
		return 1;

	u32 dst_ip = ctx->user_ip4;
	u16 dst_port = bpf_ntohs((u16)ctx->user_port);

	/* Already aimed at the tunnel: nothing to rewrite. */
	if (dst_ip == cfg->tunnel_ip && dst_port == cfg->tunnel_port)
		return 1;

	struct dabba_lpm_v4 net = {.prefixlen = 32, .ip = dst_ip};
	if (dabba_excl_net.lookup(&net) || dabba_excl_port.lookup(&dst_port)) {
		count(DABBA_ST_EXCLUDED, 1);
		return 1;
	}

	struct dabba_capture cap = {
	    .cgroup_id = cg,
	    .cookie = bpf_get_socket_cookie(ctx),
	    .orig_ip = dst_ip,
	    .orig_port = dst_port,
	};
	/*
	 * Fail closed: if the record cannot be stored the tunnel could not tell
	 * where this connection was going, and letting it through uncaptured
	 * would send it in plaintext. Refuse the connect() (EPERM) and count it.
	 */
	if (dabba_cap_ck.update(&cap.cookie, &cap) != 0) {
		count(DABBA_ST_CAP_FULL, 1);
		return 0;
	}

	ctx->user_ip4 = cfg->tunnel_ip;
	ctx->user_port = bpf_htons(cfg->tunnel_port);
	count(DABBA_ST_CAPTURED, 1);
	return 1;
}
