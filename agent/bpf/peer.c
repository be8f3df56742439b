// SPDX-License-Identifier: GPL-2.0
/*
 * getpeername(): cgroup/getpeername4, cgroup/getpeername6.
 *
 * A socket whose connect() the capture resolved or rewrote (connect.c) is connected to a
 * service's endpoint or to the node's tunnel, not to what the workload asked for. Its peer, as
 * the workload reads it, is what it asked for: the VIP, or the destination the tunnel carries
 * it to, as without a mesh (Cilium's socket load balancing does the same). Only while the
 * socket is still connected where connect() sent it; every other socket is left alone.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/net.h>
#include <linux/socket.h>

#include "maps.h"

static __always_inline struct dabba_peer *peer_of(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 0;
	return dabba_sk_peer.sk_storage_get(sk, 0, 0);
}

int dabba_peer4(struct bpf_sock_addr *ctx)
{
	struct dabba_peer *p = peer_of(ctx);
	if (!p || !dabba_is_v4mapped(&p->asked) || !dabba_is_v4mapped(&p->to))
		return 1;
	if (ctx->user_ip4 != p->to.w[3] || bpf_ntohs((u16)ctx->user_port) != p->to_port)
		return 1;
	ctx->user_ip4 = p->asked.w[3];
	ctx->user_port = bpf_htons(p->asked_port);
	return 1;
}

int dabba_peer6(struct bpf_sock_addr *ctx)
{
	struct dabba_peer *p = peer_of(ctx);
	if (!p)
		return 1;
	struct dabba_ip6 now = DABBA_CTX_IP6(ctx->user_ip6);
	if (!dabba_ip_eq(&now, &p->to) || bpf_ntohs((u16)ctx->user_port) != p->to_port)
		return 1;
	DABBA_CTX32(ctx->user_ip6[0]) = p->asked.w[0];
	DABBA_CTX32(ctx->user_ip6[1]) = p->asked.w[1];
	DABBA_CTX32(ctx->user_ip6[2]) = p->asked.w[2];
	DABBA_CTX32(ctx->user_ip6[3]) = p->asked.w[3];
	ctx->user_port = bpf_htons(p->asked_port);
	return 1;
}
