// SPDX-License-Identifier: GPL-2.0
/*
 * Ingress guard: cgroup_skb/ingress.
 *
 * For workloads whose peer authentication is STRICT, a TCP connection may
 * only be opened by the node tunnel (from an address in dabba_tun_addr, on a
 * connection tunops.c saw the tunnel open) or by a workload of this node
 * that a same-node verdict let connect directly (dabba_direct, sockops.c):
 * anything else would be plaintext that bypassed mutual TLS. The guard
 * checks segments addressed to a listening socket (the SYN, and the ACK
 * completing the handshake), so no connection from elsewhere is ever
 * established; segments of established connections pass untouched, which
 * keeps the per-packet cost at a socket state read. Drops are counted per
 * workload (dabba_guard_ct) and in total.
 *
 * Both families, the same rule: IPv6 (link-local included) from anywhere
 * but a tunnel address, on a connection the tunnel opened, or the workload
 * itself is dropped. UDP to a STRICT workload is plaintext too: only DNS
 * (either port 53) and the workload's own traffic pass. Loopback (127/8,
 * ::1) and the workload's own address as source are the workload talking to
 * itself: such packets never come from the wire (the kernel drops them as
 * martians).
 *
 * Per port (Istio's portLevelMtls): dabba_port_mtls overrides the
 * workload's mode for one of its ports, either way.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/if_ether.h>
#include <uapi/linux/in.h>
#include <uapi/linux/ip.h>
#include <uapi/linux/ipv6.h>
#include <uapi/linux/tcp.h>
#include <uapi/linux/udp.h>
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

#define DNS_PORT 53

/* A UDP datagram of DNS (either port is 53); l4 is the UDP header's offset. */
static __always_inline int is_dns(struct __sk_buff *skb, u32 l4)
{
	struct udphdr uh;
	if (bpf_skb_load_bytes(skb, l4, &uh, sizeof(uh)) < 0)
		return 0;
	return uh.source == bpf_htons(DNS_PORT) || uh.dest == bpf_htons(DNS_PORT);
}

/*
 * A direct connection's verdict, again, at its SYN and its handshake's last ACK: the
 * connect() was allowed, but a policy may have changed since (a SYN retransmitted after the
 * switch). Denied now: not admitted. No verdict now (the destination left to the tunnel, or
 * none in force): the connect-time one stands.
 */
static __always_inline int still_allowed(struct dabba_direct *dir, struct dabba_tuple *t)
{
	u32 zero = 0;
	struct dabba_config *cfg = dabba_cfg.lookup(&zero);
	if (!cfg || !cfg->verdict_gen)
		return 1;
	struct dabba_verdict_key k = {.cgroup_id = dir->cgroup_id,
				      .dst = t->dst_ip,
				      .gen = cfg->verdict_gen,
				      .port = t->dst_port};
	struct dabba_verdict *v = dabba_verdicts.lookup(&k);
	if (!v) {
		k.port = 0;
		v = dabba_verdicts.lookup(&k);
	}
	return !v || v->allow;
}

/* A TCP segment's 4-tuple (src: the sender); 0 when its header cannot be read. */
static __always_inline int tuple_of(struct __sk_buff *skb, struct dabba_ip6 *saddr,
				    struct dabba_ip6 *daddr, u32 l4, struct dabba_tuple *t)
{
	struct tcphdr th;
	if (bpf_skb_load_bytes(skb, l4, &th, sizeof(th)) < 0)
		return 0;
	t->src_ip = *saddr;
	t->dst_ip = *daddr;
	t->src_port = bpf_ntohs(th.source);
	t->dst_port = bpf_ntohs(th.dest);
	return 1;
}

/*
 * A TCP segment from the tunnel: from a tunnel address *and* of a connection the tunnel itself
 * opened (tunops.c recorded its 4-tuple). The address alone is the node's, shared by every
 * host process on a host install. Or of a same-node connection a verdict let go direct
 * (connect.c): its client published the 4-tuple (sockops.c). A segment with a forged source
 * address (a raw socket) has no such entry, unless it copies a connection that is being
 * opened this very moment, whose handshake it cannot complete.
 */
static __always_inline int from_tunnel_or_direct(struct __sk_buff *skb, struct dabba_ip6 *saddr,
						 struct dabba_ip6 *daddr, u32 l4)
{
	struct dabba_tuple t = {};
	if (!tuple_of(skb, saddr, daddr, l4, &t))
		return 0;
	if (dabba_tun_addr.lookup(saddr) && dabba_tun_conn.lookup(&t))
		return 1;
	struct dabba_direct *dir = dabba_direct.lookup(&t);
	if (!dir || !still_allowed(dir, &t))
		return 0;
	count(DABBA_ST_GUARD_DIRECT, 1);
	return 1;
}

/*
 * A packet's source and destination (either family) and where its L4 header starts; 0 when it
 * is not IP, or an IPv6 packet whose next header is not TCP or UDP (extension headers: not
 * parsed, so never admitted as the tunnel's or as DNS).
 */
static __always_inline int addresses(struct __sk_buff *skb, struct dabba_ip6 *s,
				     struct dabba_ip6 *d, u32 *l4, int *v6_plain)
{
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		struct iphdr ih;
		if (bpf_skb_load_bytes(skb, 0, &ih, sizeof(ih)) < 0)
			return 0;
		*s = dabba_v4(ih.saddr);
		*d = dabba_v4(ih.daddr);
		*l4 = ih.ihl * 4;
		return 1;
	}
	if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		struct ipv6hdr ih;
		if (bpf_skb_load_bytes(skb, 0, &ih, sizeof(ih)) < 0)
			return 0;
		*s = dabba_v6(ih.saddr.in6_u.u6_addr32[0], ih.saddr.in6_u.u6_addr32[1],
			      ih.saddr.in6_u.u6_addr32[2], ih.saddr.in6_u.u6_addr32[3]);
		*d = dabba_v6(ih.daddr.in6_u.u6_addr32[0], ih.daddr.in6_u.u6_addr32[1],
			      ih.daddr.in6_u.u6_addr32[2], ih.daddr.in6_u.u6_addr32[3]);
		*l4 = sizeof(ih);
		*v6_plain = ih.nexthdr == IPPROTO_TCP || ih.nexthdr == IPPROTO_UDP;
		return 1;
	}
	return 0;
}

/* 1: the packet may reach the workload (from the tunnel, or from itself). */
static __always_inline int admitted(struct __sk_buff *skb, int udp)
{
	struct dabba_ip6 s = {}, d = {};
	u32 l4 = 0;
	int plain_l4 = 1;
	if (!addresses(skb, &s, &d, &l4, &plain_l4))
		return skb->protocol != bpf_htons(ETH_P_IP) &&
		       skb->protocol != bpf_htons(ETH_P_IPV6);
	if (dabba_is_loopback(&s) || dabba_ip_eq(&s, &d))
		return 1;
	if (!plain_l4)
		return 0;
	if (udp)
		return is_dns(skb, l4);
	return from_tunnel_or_direct(skb, &s, &d, l4);
}

/* Is the socket's port STRICT: its own mode (dabba_port_mtls), else the workload's. */
static __always_inline int strict_port(struct __sk_buff *skb, struct bpf_sock *sk, u32 flags)
{
	int strict = flags & DABBA_WL_STRICT;
	struct dabba_ip_port k = {.port = (u16)sk->src_port};
	if (skb->protocol == bpf_htons(ETH_P_IP)) {
		u32 ip = 0;
		if (bpf_skb_load_bytes(skb, offsetof(struct iphdr, daddr), &ip, sizeof(ip)) < 0)
			return strict;
		k.ip = dabba_v4(ip);
	} else if (skb->protocol == bpf_htons(ETH_P_IPV6)) {
		if (bpf_skb_load_bytes(skb, offsetof(struct ipv6hdr, daddr), &k.ip, sizeof(k.ip)) <
		    0)
			return strict;
	} else {
		return strict;
	}
	u8 *mode = dabba_port_mtls.lookup(&k);
	return mode ? *mode == DABBA_MTLS_STRICT : strict;
}

int dabba_guard(struct __sk_buff *skb)
{
	struct bpf_sock *sk = skb->sk;
	if (!sk)
		return 1;
	sk = bpf_sk_fullsock(sk);
	if (!sk)
		return 1;
	int udp = sk->protocol == IPPROTO_UDP;
	if (!udp && (sk->protocol != IPPROTO_TCP || sk->state != BPF_TCP_LISTEN))
		return 1;

	u64 cg = 0;
	struct dabba_workload *wl = dabba_sk_workload(sk, &cg);
	if (!wl || !strict_port(skb, sk, wl->flags))
		return 1;
	if (admitted(skb, udp))
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
