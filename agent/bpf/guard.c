// SPDX-License-Identifier: GPL-2.0
/*
 * Ingress guard: cgroup_skb/ingress.
 *
 * For workloads whose peer authentication is STRICT, a TCP connection may
 * only be opened by the node tunnel (whose addresses are in dabba_tun_addr):
 * anything else would be plaintext that bypassed mutual TLS. The guard
 * checks segments addressed to a listening socket (the SYN, and the ACK
 * completing the handshake), so no connection from elsewhere is ever
 * established; segments of established connections pass untouched, which
 * keeps the per-packet cost at a socket state read. Drops are counted per
 * workload (dabba_guard_ct) and in total.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
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

int dabba_guard(struct __sk_buff *skb)
{
	if (skb->protocol != bpf_htons(ETH_P_IP))
		return 1;

	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk || sk->protocol != IPPROTO_TCP || sk->state != BPF_TCP_LISTEN)
		return 1;

	u64 cg = 0;
	struct dabba_workload *wl = dabba_sk_workload(sk, &cg);
	if (!wl || !(wl->flags & DABBA_WL_STRICT))
		return 1;

	u32 saddr = 0;
	if (bpf_skb_load_bytes(skb, offsetof(struct iphdr, saddr), &saddr, sizeof(saddr)) < 0)
		return 1;
	if (dabba_tun_addr.lookup(&saddr))
		return 1;

	u64 one = 1;
	u64 *n = dabba_guard_ct.lookup(&cg);
	if (n)
		__sync_fetch_and_add(n, 1);
	else
		dabba_guard_ct.update(&cg, &one);
	count(DABBA_ST_GUARD_DROP, 1);
	return 0;
}
