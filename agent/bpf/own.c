// SPDX-License-Identifier: GPL-2.0
/*
 * Listener ownership: sk_lookup in the node's network namespace.
 *
 * Captured connections (to tunnel_ip:tunnel_port, and [tunnel_ip6]:tunnel_port, or to one of the
 * spread ports: see spread()) and HBONE (any address, hbone_port) go to the tunnel's own
 * listening sockets, registered by the tunnel in
 * dabba_tun_sk, and to no other: not to a socket that joined the port's reuseport group
 * (NO_REUSEPORT), not to one bound to a more specific address, not to one bound while the tunnel
 * was down. Before this, a root process in the node's namespace bound 15001 with SO_REUSEPORT and
 * received pods' captured connections in plaintext.
 *
 * Fail closed: while the tunnel has no listener registered (it is
 * restarting), such connections are refused and counted.
 */
#include <uapi/linux/bpf.h>

#include "maps.h"

static __always_inline void count(u32 stat)
{
	u64 *v = dabba_stats.lookup(&stat);
	if (v)
		*v += 1;
}

static __always_inline int local6_is(struct bpf_sk_lookup *ctx, struct dabba_ip6 *a)
{
	struct dabba_ip6 l = DABBA_CTX_IP6(ctx->local_ip6);
	return dabba_ip_eq(&l, a);
}

/*
 * A captured connection sent to one of the spread ports (connect.c, spread_base): to the
 * tunnel's address, and its 4-tuple published by sockops.c before the SYN left. Anything
 * else to those ports (a host process's connection) is not the tunnel's.
 */
static __always_inline int spread(struct bpf_sk_lookup *ctx, struct dabba_config *cfg)
{
	u32 port = ctx->local_port;
	if (!cfg->spread_count || port < cfg->spread_base ||
	    port >= (u32)cfg->spread_base + cfg->spread_count)
		return 0;
	struct dabba_tuple t = {
	    .src_port = bpf_ntohs((u16)ctx->remote_port),
	    .dst_port = (u16)port,
	};
	if (ctx->family == 2 /* AF_INET */) {
		if (ctx->local_ip4 != cfg->tunnel_ip)
			return 0;
		t.src_ip = dabba_v4(ctx->remote_ip4);
		t.dst_ip = dabba_v4(ctx->local_ip4);
	} else if (ctx->family == 10 /* AF_INET6 */) {
		if (dabba_ip_zero(&cfg->tunnel_ip6) || !local6_is(ctx, &cfg->tunnel_ip6))
			return 0;
		t.src_ip = DABBA_CTX_IP6(ctx->remote_ip6);
		t.dst_ip = DABBA_CTX_IP6(ctx->local_ip6);
	} else {
		return 0;
	}
	return dabba_cap_tp.lookup(&t) != 0;
}

int dabba_own_in(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != 6 /* TCP */)
		return SK_PASS;
	u32 zero = 0;
	struct dabba_config *cfg = dabba_cfg.lookup(&zero);
	if (!cfg)
		return SK_PASS;
	u32 key;
	if (ctx->local_port == cfg->tunnel_port && ctx->family == 2 /* AF_INET */ &&
	    ctx->local_ip4 == cfg->tunnel_ip)
		key = TUN_SK_OUTBOUND;
	else if (ctx->local_port == cfg->tunnel_port && ctx->family == 10 /* AF_INET6 */ &&
		 !dabba_ip_zero(&cfg->tunnel_ip6) && local6_is(ctx, &cfg->tunnel_ip6))
		key = TUN_SK_OUTBOUND6;
	else if (cfg->hbone_port && ctx->local_port == cfg->hbone_port)
		key = TUN_SK_HBONE; /* an IPv6 lookup cannot take it: refused below */
	else if (spread(ctx, cfg))
		key = ctx->family == 2 ? TUN_SK_OUTBOUND : TUN_SK_OUTBOUND6;
	else
		return SK_PASS;
	struct bpf_sock *sk = (struct bpf_sock *)dabba_tun_sk.lookup(&key);
	if (!sk) {
		count(DABBA_ST_OWN_NO_TUNNEL);
		return SK_DROP;
	}
	long err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_NO_REUSEPORT);
	bpf_sk_release(sk);
	if (err) {
		count(DABBA_ST_OWN_NO_TUNNEL);
		return SK_DROP;
	}
	return SK_PASS;
}
