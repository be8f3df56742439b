// SPDX-License-Identifier: GPL-2.0
/*
 * Capture: cgroup/connect4, cgroup/connect6, cgroup/sendmsg4, cgroup/sendmsg6.
 *
 * For enrolled workloads, rewrite connect() to the node tunnel's outbound
 * listener and remember where the workload wanted to go, together with the
 * caller's cgroup id (a kernel-attested source identity the workload cannot
 * forge), keyed by socket cookie. sockops (sockops.c) moves the record under
 * the 4-tuple the tunnel sees once the connection is established.
 *
 * Every path of an enrolled workload is decided here, for both families
 * (an AF_INET6 socket reaches IPv4 through IPv4-mapped addresses, so
 * ::ffff:a.b.c.d is decided exactly as a.b.c.d):
 *  - loopback and unspecified (127/8, 0/8, ::1, ::): left alone. The kernel
 *    connects them inside the caller's own network namespace; the tunnel,
 *    which lives in the node's, must never dial them on the caller's behalf
 *    (it would reach the node's own loopback: its admin port, kubelet...).
 *  - the mesh's own ports, link-local addresses and the node's own
 *    addresses: refused (EPERM), counted, and reported as a refused flow.
 *    Exclusions (operator's CIDRs and ports) go direct from the workload's
 *    own address, as without a mesh, but never to a mesh port.
 *  - native IPv6: captured like IPv4, to the tunnel's IPv6 listener
 *    (dabba_config.tunnel_ip6), where the node's tunnel has one; refused
 *    where it has none, never let through in plaintext with no identity.
 *  - a workload of this node, where the agent compiled a verdict for the
 *    caller, that address and port (dabba_verdicts): allowed, straight to it
 *    through the kernel's TCP, no tunnel; denied, EPERM and a refused flow
 *    naming the verdict. Without a verdict, the tunnel takes it as before.
 *  - non-TCP (UDP connect and unconnected sendmsg): only DNS (port 53) and
 *    loopback leave, unless the node's config lets non-TCP pass.
 *
 * A service's VIP and port (dabba_svc) is resolved first, to one of its endpoints (round
 * robin, least connections or random, ejected endpoints skipped), and the connection is then
 * decided as one to that endpoint: direct when a same-node verdict allows it, else captured
 * with the endpoint chosen and the service named for the tunnel. A service without endpoints
 * is refused with ECONNREFUSED, as a kube-proxy REJECT is. Every socket whose destination was
 * resolved or rewritten keeps what it asked for (dabba_sk_peer): getpeername() gives that back
 * (peer.c), and sockops keeps the chosen endpoint's load and health (sockops.c).
 *
 * Never touched: workloads that are not enrolled, the tunnel's own sockets
 * (its cgroup is not enrolled, and its sockets carry tunnel_mark).
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

#define DNS_PORT     53
#define ECONNREFUSED 111

/* What the capture does with one destination. */
enum verdict {
	V_CAPTURE = 0, /* rewrite to the tunnel */
	V_DIRECT,      /* excluded: the kernel connects it as it is */
	V_LOCAL,       /* loopback or unspecified: stays in the caller's netns */
	V_REFUSE,      /* EPERM; *why says why (enum dabba_refusal) */
};

/* The enrolled, capturing workload calling, with the node's config; 0 when none. */
static __always_inline struct dabba_config *capturing(struct bpf_sock_addr *ctx, u64 *cg)
{
	struct dabba_workload *wl = dabba_current_workload(cg);
	if (!wl || !(wl->flags & DABBA_WL_CAPTURE))
		return 0;
	u32 zero = 0;
	struct dabba_config *cfg = dabba_cfg.lookup(&zero);
	if (!cfg || !cfg->enabled)
		return 0;
	struct bpf_sock *sk = ctx->sk;
	if (sk && cfg->tunnel_mark && sk->mark == cfg->tunnel_mark)
		return 0;
	return cfg;
}

static __always_inline int is_node_ip(struct dabba_ip6 *a)
{
	return dabba_node_ip.lookup(a) != 0;
}

/* An excluded destination: its CIDR (dabba_excl_net) or its port (dabba_excl_port). */
static __always_inline int excluded(struct dabba_ip6 *a, u16 port)
{
	struct dabba_lpm net = {.prefixlen = 128, .ip = *a};
	return dabba_excl_net.lookup(&net) || dabba_excl_port.lookup(&port);
}

/*
 * The verdict on a destination of either family (IPv4 as IPv4-mapped) and port (host order).
 * Native IPv6 is captured only where the tunnel has an IPv6 listener; else refused, never let
 * through unmeshed.
 */
static __always_inline enum verdict decide(struct dabba_config *cfg, struct dabba_ip6 *a, u16 port,
					   u8 *why)
{
	int v4 = dabba_is_v4mapped(a);
	u32 h = bpf_ntohl(a->w[3]);
	if (v4 && ((h >> 24) == 127 || (h >> 24) == 0))
		return V_LOCAL;
	if (!v4 && !a->w[0] && !a->w[1] && !a->w[2] && (!a->w[3] || a->w[3] == bpf_htonl(1)))
		return V_LOCAL; /* :: and ::1 */
	if (dabba_mesh_port.lookup(&port)) {
		*why = DABBA_REFUSED_MESH_PORT;
		return V_REFUSE;
	}
	if (excluded(a, port))
		return V_DIRECT;
	if (v4 ? (h >> 16) == 0xa9fe /* 169.254.0.0/16 */
	       : (bpf_ntohl(a->w[0]) & 0xffc00000) == 0xfe800000 /* fe80::/10 */) {
		*why = DABBA_REFUSED_LINK_LOCAL;
		return V_REFUSE;
	}
	if (is_node_ip(a)) {
		*why = DABBA_REFUSED_NODE;
		return V_REFUSE;
	}
	if (!v4 && dabba_ip_zero(&cfg->tunnel_ip6)) {
		*why = DABBA_REFUSED_IPV6;
		return V_REFUSE;
	}
	return V_CAPTURE;
}

/* An AF_INET6 socket's destination (user_ip6: IPv6, or IPv4-mapped for IPv4). */
static __always_inline struct dabba_ip6 dest6(struct bpf_sock_addr *ctx)
{
	return DABBA_CTX_IP6(ctx->user_ip6);
}

/*
 * A refused connect(): counted, and reported through the closed-flow ring
 * as a flow that never opened, so `dabba flows` shows who tried what.
 */
static __always_inline int refuse_rule(struct bpf_sock_addr *ctx, u64 cg, struct dabba_ip6 *a,
				       u16 port, u8 why, u32 rule)
{
	u64 now = bpf_ktime_get_ns();
	struct dabba_flow f = {
	    .cookie = bpf_get_socket_cookie(ctx),
	    .cgroup_id = cg,
	    .start_ns = now,
	    .last_ns = now,
	    .end_ns = now,
	    .dst_ip = *a,
	    .orig_ip = *a,
	    .dst_port = port,
	    .orig_port = port,
	    .direction = DABBA_DIR_OUTBOUND,
	    .close = DABBA_CLOSE_REFUSED,
	    .last_state = BPF_TCP_CLOSE,
	    .refused = why,
	    .rule = rule,
	};
	if (dabba_flow_ev.ringbuf_output(&f, sizeof(f), 0) != 0)
		count(DABBA_ST_RING_DROP, 1);
	if (why == DABBA_REFUSED_POLICY)
		count(DABBA_ST_POLICY_REFUSED, 1);
	else if (why == DABBA_REFUSED_IPV6)
		count(DABBA_ST_V6_REFUSED, 1);
	else if (why == DABBA_REFUSED_CAP_FULL)
		count(DABBA_ST_CAP_FULL, 1);
	else if (why == DABBA_REFUSED_LIMIT)
		count(DABBA_ST_LIMIT_REFUSED, 1);
	else
		count(DABBA_ST_DST_REFUSED, 1);
	return 0;
}

static __always_inline int refuse(struct bpf_sock_addr *ctx, u64 cg, struct dabba_ip6 *a, u16 port,
				  u8 why)
{
	return refuse_rule(ctx, cg, a, port, why, 0);
}

/*
 * The same-node verdict on a connection from workload cg to a (a workload of this node),
 * port: the port's own entry, else the wildcard (port 0), in the generation in force. None:
 * the tunnel decides (no generation yet, a destination left out, another node's address).
 */
static __always_inline struct dabba_verdict *verdict_of(struct dabba_config *cfg, u64 cg,
							struct dabba_ip6 *a, u16 port)
{
	if (!cfg->verdict_gen)
		return 0;
	struct dabba_verdict_key k = {
	    .cgroup_id = cg, .dst = *a, .gen = cfg->verdict_gen, .port = port};
	struct dabba_verdict *v = dabba_verdicts.lookup(&k);
	if (v)
		return v;
	k.port = 0;
	return dabba_verdicts.lookup(&k);
}

/*
 * A same-node connection the verdicts decide: allowed, it goes straight to its destination
 * through the kernel's own TCP (no rewrite; sockops.c publishes its 4-tuple for the guard and
 * the steering); denied, connect() fails with EPERM and the denial is reported with its rule.
 * Returns the hook's value, or -1 when no verdict applies.
 */
static __always_inline int direct(struct bpf_sock_addr *ctx, struct dabba_config *cfg, u64 cg,
				  struct dabba_ip6 *a, u16 port)
{
	struct dabba_verdict *v = verdict_of(cfg, cg, a, port);
	if (!v)
		return -1;
	if (!v->allow)
		return refuse_rule(ctx, cg, a, port, DABBA_REFUSED_POLICY, v->rule);
	struct dabba_direct d = {.cgroup_id = cg, .rule = v->rule};
	u64 cookie = bpf_get_socket_cookie(ctx);
	if (dabba_direct_ck.update(&cookie, &d) != 0)
		return -1; /* cannot vouch for it: the tunnel takes it */
	count(DABBA_ST_DIRECT, 1);
	return 1;
}

/*
 * Record where the connection was going, keyed by socket cookie. Fail
 * closed: if the record cannot be stored the tunnel could not tell where
 * this connection was going, and letting it through uncaptured would send
 * it in plaintext. Refuse the connect() (EPERM) and count it.
 */
static __always_inline int remember(struct bpf_sock_addr *ctx, u64 cg, struct dabba_ip6 *a,
				    u16 port, struct dabba_peer *svc)
{
	struct dabba_capture cap = {
	    .cgroup_id = cg,
	    .cookie = bpf_get_socket_cookie(ctx),
	    .orig_ip = *a,
	    .orig_port = port,
	};
	if (svc->ep_port) { /* a service's endpoint, chosen here: the tunnel is told the service */
		cap.svc_ip = svc->asked;
		cap.svc_port = svc->asked_port;
	}
	if (dabba_cap_ck.update(&cap.cookie, &cap) != 0)
		return 0;
	count(DABBA_ST_CAPTURED, 1);
	return 1;
}

/*
 * One workload holds at most cfg->max_open captured connections, so that it cannot take the
 * node's capture map (every other workload's connect() would then be refused). Counted from
 * connect() until the socket is released (sock.c, dabba_sock_gone), by cookie in dabba_cap_open
 * (a socket connected twice is counted once). Returns 0 when the workload is at its limit.
 * Two CPUs may both pass the check at the limit: it is exceeded by at most the CPUs' number.
 */
static __always_inline int take_slot(struct bpf_sock_addr *ctx, struct dabba_config *cfg, u64 cg)
{
	u64 cookie = bpf_get_socket_cookie(ctx);
	if (dabba_cap_open.lookup(&cookie))
		return 1;
	u64 *n = dabba_wl_open.lookup(&cg);
	if (cfg->max_open && n && *n >= cfg->max_open)
		return 0;
	if (dabba_cap_open.update(&cookie, &cg) != 0)
		return 0; /* full: not counted, so not captured either */
	if (n) {
		__sync_fetch_and_add(n, 1);
	} else {
		u64 one = 1;
		if (dabba_wl_open.insert(&cg, &one) != 0) {
			n = dabba_wl_open.lookup(&cg); /* another CPU inserted it meanwhile */
			if (n)
				__sync_fetch_and_add(n, 1);
		}
	}
	return 1;
}

/*
 * UDP: DNS and loopback leave; anything else only when the config lets
 * non-TCP pass. Counted, not reported per datagram (one record each would
 * flood the ring).
 */
static __always_inline int datagram(struct dabba_config *cfg, enum verdict v, u16 port)
{
	if (v == V_LOCAL || port == DNS_PORT || (cfg->flags & DABBA_CFG_PASS_NON_TCP))
		return 1;
	count(DABBA_ST_PROTO_REFUSED, 1);
	return 0;
}

/*
 * One endpoint of svc by its policy, into *out. The endpoints are taken in turn from the
 * service's round-robin cursor (random: from a random one), ejected ones skipped: round robin
 * and random take the first one not ejected, least connections the one with the fewest open
 * connections (the first of equals in that turn). When every endpoint is ejected, the one in
 * turn is tried rather than none. Returns 0 when the set is not whole (the agent writes every
 * endpoint's state with its slot, before the entry points at the set).
 */
static __always_inline int pick(struct dabba_svc *svc, struct dabba_ip6 *out)
{
	u64 now = bpf_ktime_get_ns();
	u32 n = svc->count, id = svc->id;
	u32 start = svc->rr;
	if (svc->policy == DABBA_LB_RANDOM)
		start = bpf_get_prandom_u32();
	else
		__sync_fetch_and_add(&svc->rr, 1); /* bcc's target has no fetching atomics: two
						      racing connect()s may take the same turn */
	start %= n;
	int lc = svc->policy == DABBA_LB_LEAST_CONN;
	u32 best = start;
	u64 fewest = ~0ULL;
	for (u32 j = 0; j < DABBA_SVC_EP_MAX; j++) {
		/* opaque to clang, so that the loop keeps the constant bound the verifier needs */
		asm volatile("" : "+r"(j));
		if (j >= n)
			break;
		u32 slot = (start + j) % n;
		struct dabba_svc_slot s = {.id = id, .slot = slot};
		struct dabba_ip6 *ip = dabba_svc_ep.lookup(&s);
		if (!ip)
			return 0;
		struct dabba_ip_port k = {.ip = *ip, .port = svc->target_port};
		struct dabba_ep_state *st = dabba_lb_ep.lookup(&k);
		if (!st)
			return 0;
		if (st->ejected_until > now)
			continue;
		if (!lc) {
			best = slot;
			break;
		}
		if (st->active < fewest) {
			fewest = st->active;
			best = slot;
		}
	}
	struct dabba_svc_slot s = {.id = id, .slot = best};
	struct dabba_ip6 *ip = dabba_svc_ep.lookup(&s);
	if (!ip)
		return 0;
	*out = *ip;
	return 1;
}

#define NO_ENDPOINT (-1)

/*
 * connect() to a service's VIP and port (dabba_svc): *a and *port become the endpoint chosen
 * and its target port, and *svc what getpeername() and sockops need. Returns 1 resolved, 0 not
 * a service, NO_ENDPOINT when it has none.
 */
static __always_inline int resolve(struct dabba_ip6 *a, u16 *port, struct dabba_peer *svc)
{
	struct dabba_svc_key k = {.vip = *a, .port = *port};
	svc->asked = *a;
	svc->asked_port = *port;
	struct dabba_ip6 ep = {};
	struct dabba_svc *s = dabba_svc.lookup(&k);
	if (!s)
		return 0;
	if (!s->count)
		return NO_ENDPOINT;
	if (!pick(s, &ep))
		return NO_ENDPOINT;
	svc->ep = ep;
	svc->ep_port = s->target_port;
	svc->svc_id = s->id;
	svc->svc_count = s->count;
	*a = ep;
	*port = s->target_port;
	count(DABBA_ST_SVC_RESOLVED, 1);
	return 1;
}

/* A service without endpoints: ECONNREFUSED, reported as a refused flow to its VIP. */
static __always_inline int no_endpoint(struct bpf_sock_addr *ctx, u64 cg, struct dabba_peer *svc)
{
	refuse(ctx, cg, &svc->asked, svc->asked_port, DABBA_REFUSED_NO_ENDPOINT);
	count(DABBA_ST_SVC_NO_ENDPOINT, 1);
	bpf_set_retval(-ECONNREFUSED);
	return 0;
}

/*
 * Keep what the socket asked for and where it goes (to, to_port) for getpeername() (peer.c)
 * and sockops; best effort: without it, getpeername() gives the address connected to, and the
 * endpoint's load and health miss this connection.
 */
/* The port a captured connect() is sent to on the tunnel's address (see spread_base). */
static __always_inline u16 tunnel_port_of(struct dabba_config *cfg)
{
	if (!cfg->spread_count)
		return cfg->tunnel_port;
	return cfg->spread_base + (u16)(bpf_get_prandom_u32() % cfg->spread_count);
}

static __always_inline void keep_peer(struct bpf_sock_addr *ctx, struct dabba_peer *p,
				      struct dabba_ip6 *to, u16 to_port)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return;
	struct dabba_peer *st = dabba_sk_peer.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (!st)
		return;
	p->to = *to;
	p->to_port = to_port;
	*st = *p;
}

/* An AF_INET6 socket's destination set to a (IPv4 as IPv4-mapped, so over IPv4). */
static __always_inline void set_dest6(struct bpf_sock_addr *ctx, struct dabba_ip6 *a)
{
	DABBA_CTX32(ctx->user_ip6[0]) = a->w[0];
	DABBA_CTX32(ctx->user_ip6[1]) = a->w[1];
	DABBA_CTX32(ctx->user_ip6[2]) = a->w[2];
	DABBA_CTX32(ctx->user_ip6[3]) = a->w[3];
}

#define CAPTURE 2 /* act(): rewrite the destination to the tunnel */

/*
 * What connect4 and connect6 do with a verdict on destination a: the hook's return value
 * (1 go on, 0 EPERM), or CAPTURE once the destination is remembered.
 */
static __always_inline int act(struct bpf_sock_addr *ctx, struct dabba_config *cfg, u64 cg,
			       enum verdict v, u8 why, struct dabba_ip6 *a, u16 port,
			       struct dabba_peer *svc)
{
	if (ctx->type != SOCK_STREAM)
		return datagram(cfg, v, port);
	if (v == V_LOCAL) {
		count(DABBA_ST_LOCAL, 1);
		return 1;
	}
	if (v == V_DIRECT) {
		count(DABBA_ST_EXCLUDED, 1);
		return 1;
	}
	if (v == V_CAPTURE || (v == V_REFUSE && why == DABBA_REFUSED_IPV6)) {
		int r = direct(ctx, cfg, cg, a, port);
		if (r >= 0)
			return r;
	}
	if (v == V_REFUSE)
		return refuse(ctx, cg, a, port, why);
	if (!take_slot(ctx, cfg, cg))
		return refuse(ctx, cg, a, port, DABBA_REFUSED_LIMIT);
	if (!remember(ctx, cg, a, port, svc))
		return refuse(ctx, cg, a, port, DABBA_REFUSED_CAP_FULL);
	return CAPTURE;
}

int dabba_connect4(struct bpf_sock_addr *ctx)
{
	u64 cg = 0;
	struct dabba_config *cfg = capturing(ctx, &cg);
	if (!cfg)
		return 1;

	struct dabba_ip6 a = dabba_v4(ctx->user_ip4);
	u16 port = bpf_ntohs((u16)ctx->user_port);
	struct dabba_peer svc = {};
	int lb = ctx->type == SOCK_STREAM ? resolve(&a, &port, &svc) : 0;
	if (lb == NO_ENDPOINT || (lb && !dabba_is_v4mapped(&a)))
		return no_endpoint(ctx, cg, &svc);
	u8 why = 0;
	int r = act(ctx, cfg, cg, decide(cfg, &a, port, &why), why, &a, port, &svc);
	if (r == CAPTURE) {
		struct dabba_ip6 to = dabba_v4(cfg->tunnel_ip);
		u16 to_port = tunnel_port_of(cfg);
		keep_peer(ctx, &svc, &to, to_port);
		ctx->user_ip4 = cfg->tunnel_ip;
		ctx->user_port = bpf_htons(to_port);
		return 1;
	}
	if (r && lb) { /* straight to the endpoint chosen */
		keep_peer(ctx, &svc, &a, port);
		ctx->user_ip4 = a.w[3];
		ctx->user_port = bpf_htons(port);
	}
	return r;
}

int dabba_connect6(struct bpf_sock_addr *ctx)
{
	u64 cg = 0;
	struct dabba_config *cfg = capturing(ctx, &cg);
	if (!cfg)
		return 1;

	struct dabba_ip6 a = dest6(ctx);
	u16 port = bpf_ntohs((u16)ctx->user_port);
	struct dabba_peer svc = {};
	int lb = ctx->type == SOCK_STREAM ? resolve(&a, &port, &svc) : 0;
	if (lb == NO_ENDPOINT)
		return no_endpoint(ctx, cg, &svc);
	u8 why = 0;
	int r = act(ctx, cfg, cg, decide(cfg, &a, port, &why), why, &a, port, &svc);
	if (r == CAPTURE) {
		/* to the tunnel's IPv4 listener, mapped, for IPv4: the connection goes over IPv4 */
		struct dabba_ip6 to =
		    dabba_is_v4mapped(&a) ? dabba_v4(cfg->tunnel_ip) : cfg->tunnel_ip6;
		u16 to_port = tunnel_port_of(cfg);
		keep_peer(ctx, &svc, &to, to_port);
		set_dest6(ctx, &to);
		ctx->user_port = bpf_htons(to_port);
		return 1;
	}
	if (r && lb) { /* straight to the endpoint chosen */
		keep_peer(ctx, &svc, &a, port);
		set_dest6(ctx, &a);
		ctx->user_port = bpf_htons(port);
	}
	return r;
}

/* Unconnected UDP (sendto): the same rule as a UDP connect(). */
int dabba_sendmsg4(struct bpf_sock_addr *ctx)
{
	u64 cg = 0;
	struct dabba_config *cfg = capturing(ctx, &cg);
	if (!cfg)
		return 1;
	struct dabba_ip6 a = dabba_v4(ctx->user_ip4);
	u16 port = bpf_ntohs((u16)ctx->user_port);
	u8 why = 0;
	return datagram(cfg, decide(cfg, &a, port, &why), port);
}

int dabba_sendmsg6(struct bpf_sock_addr *ctx)
{
	u64 cg = 0;
	struct dabba_config *cfg = capturing(ctx, &cg);
	if (!cfg)
		return 1;
	struct dabba_ip6 a = dest6(ctx);
	u16 port = bpf_ntohs((u16)ctx->user_port);
	u8 why = 0;
	return datagram(cfg, decide(cfg, &a, port, &why), port);
}
