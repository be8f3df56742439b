// SPDX-License-Identifier: GPL-2.0
/*
 * Plaintext inbound for PERMISSIVE (and DISABLE) workloads: sk_lookup.
 *
 * Attached to a workload's network namespace. A TCP connection to the
 * workload that does not come from the node tunnel (from a tunnel address, on
 * a connection tunops.c saw the tunnel open: the address alone is shared by
 * every host process on a host install) is a
 * plaintext peer outside the mesh; instead of the workload's own listener it
 * goes to the tunnel's 15006 listener in that namespace (dabba_plain, keyed
 * by the workload's address), which decides policy -- no identity, so only
 * namespace-free rules can allow it -- and connects to the workload itself.
 * The accepted socket keeps the original destination address and port.
 *
 * A port whose own mode is STRICT (portLevelMtls) is not steered: the
 * connection goes on to the workload's listener, where the ingress guard
 * drops it.
 *
 * Fail closed: if the tunnel has no listener for the workload (it is
 * restarting), the connection is refused, never let through unchecked.
 */
#include <uapi/linux/bpf.h>

#include "maps.h"

static __always_inline void count(u32 stat)
{
	u64 *v = dabba_stats.lookup(&stat);
	if (v)
		*v += 1;
}

/*
 * IPv6 TCP: the tunnel has no IPv6 listener, so IPv6 plaintext (link-local
 * included) cannot be checked and is dropped; the workload's own (::1, or
 * its own address) passes.
 */
static __always_inline int plain_v6(struct bpf_sk_lookup *ctx)
{
	u32 s0 = ctx->remote_ip6[0], s1 = ctx->remote_ip6[1], s2 = ctx->remote_ip6[2];
	u32 s3 = ctx->remote_ip6[3];
	if (!s0 && !s1 && !s2 && s3 == bpf_htonl(1))
		return SK_PASS;
	if (s0 == ctx->local_ip6[0] && s1 == ctx->local_ip6[1] && s2 == ctx->local_ip6[2] &&
	    s3 == ctx->local_ip6[3])
		return SK_PASS;
	count(DABBA_ST_PLAIN_V6_DROP);
	return SK_DROP;
}

int dabba_plain_in(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != 6 /* TCP */)
		return SK_PASS;
	if (ctx->family == 10 /* AF_INET6 */)
		return plain_v6(ctx);
	if (ctx->family != 2 /* AF_INET */)
		return SK_PASS;
	u32 src = ctx->remote_ip4;
	u32 dst = ctx->local_ip4;
	if (src == dst || (bpf_ntohl(src) >> 24) == 127)
		return SK_PASS; /* the workload talking to itself */
	struct dabba_tuple t = {
	    .src_ip = src,
	    .dst_ip = dst,
	    .src_port = bpf_ntohs((u16)ctx->remote_port),
	    .dst_port = (u16)ctx->local_port,
	};
	if (dabba_tun_addr.lookup(&src) && dabba_tun_conn.lookup(&t))
		return SK_PASS; /* the tunnel delivering an allowed connection (tunops.c) */
	struct dabba_ip_port port = {.ip = dst, .port = (u16)ctx->local_port};
	u8 *mode = dabba_port_mtls.lookup(&port);
	if (!mode) {
		port.port = 0; /* the workload's own mode, when some of its ports have theirs */
		mode = dabba_port_mtls.lookup(&port);
	}
	if (mode && *mode == DABBA_MTLS_STRICT)
		return SK_PASS; /* a STRICT port (portLevelMtls): the ingress guard drops it */
	struct bpf_sock *sk = (struct bpf_sock *)dabba_plain.lookup(&dst);
	if (!sk) {
		count(DABBA_ST_PLAIN_NO_TUNNEL);
		return SK_DROP;
	}
	/*
	 * NO_REUSEPORT: this very socket, never another one that joined its
	 * port's reuseport group inside the workload's namespace.
	 */
	long err = bpf_sk_assign(ctx, sk, BPF_SK_LOOKUP_F_NO_REUSEPORT);
	bpf_sk_release(sk);
	if (err) {
		count(DABBA_ST_PLAIN_NO_TUNNEL);
		return SK_DROP;
	}
	count(DABBA_ST_PLAIN_STEERED);
	return SK_PASS;
}
