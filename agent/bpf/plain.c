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
 * Both families: IPv6 plaintext is steered like IPv4 when the tunnel's
 * listener is registered under the workload's IPv6 address; where it is
 * not (the workload has no IPv6 address the mesh knows, a link-local
 * destination), it is dropped and counted (DABBA_ST_PLAIN_V6_DROP).
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

static __always_inline int refused_now(void)
{
	count(DABBA_ST_POLICY_REFUSED);
	return SK_DROP;
}

/*
 * A direct connection's verdict, again (guard.c has the same; bcc rewrites map calls only in
 * a program's own file, so they cannot share a header).
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

int dabba_plain_in(struct bpf_sk_lookup *ctx)
{
	if (ctx->protocol != 6 /* TCP */)
		return SK_PASS;
	struct dabba_ip6 src, dst;
	if (ctx->family == 2 /* AF_INET */) {
		src = dabba_v4(ctx->remote_ip4);
		dst = dabba_v4(ctx->local_ip4);
	} else if (ctx->family == 10 /* AF_INET6 */) {
		src = DABBA_CTX_IP6(ctx->remote_ip6);
		dst = DABBA_CTX_IP6(ctx->local_ip6);
	} else {
		return SK_PASS;
	}
	if (dabba_ip_eq(&src, &dst) || dabba_is_loopback(&src))
		return SK_PASS; /* the workload talking to itself */
	struct dabba_tuple t = {
	    .src_ip = src,
	    .dst_ip = dst,
	    .src_port = bpf_ntohs((u16)ctx->remote_port),
	    .dst_port = (u16)ctx->local_port,
	};
	if (dabba_tun_addr.lookup(&src) && dabba_tun_conn.lookup(&t))
		return SK_PASS; /* the tunnel delivering an allowed connection (tunops.c) */
	struct dabba_direct *dir = dabba_direct.lookup(&t);
	if (dir) {
		if (!still_allowed(dir, &t))
			return refused_now(); /* a policy change since its connect() denies it */
		count(DABBA_ST_GUARD_DIRECT);
		return SK_PASS; /* a same-node connection a verdict allowed (connect.c, sockops.c)
				 */
	}
	struct dabba_ip_port port = {.ip = dst, .port = (u16)ctx->local_port};
	u8 *mode = dabba_port_mtls.lookup(&port);
	if (!mode) {
		port.port = 0; /* the workload's own mode, when some of its ports have theirs */
		mode = dabba_port_mtls.lookup(&port);
	}
	if (mode && *mode == DABBA_MTLS_STRICT)
		return SK_PASS; /* a STRICT port (portLevelMtls): the ingress guard drops it */
	/*
	 * The tunnel's 15006 listener in this namespace, registered under each of the workload's
	 * addresses; one socket (dual-stack) serves both families. None: fail closed.
	 */
	struct bpf_sock *sk = (struct bpf_sock *)dabba_plain.lookup(&dst);
	if (!sk) {
		count(ctx->family == 10 ? DABBA_ST_PLAIN_V6_DROP : DABBA_ST_PLAIN_NO_TUNNEL);
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
