// SPDX-License-Identifier: GPL-2.0
/*
 * Flow tracking: sockops.
 *
 * For sockets of enrolled workloads (tagged by sock.c):
 *  - at connect() of a captured connection, publish the capture record
 *    under the 4-tuple the tunnel sees on its accepted socket (dabba_cap_tp);
 *    of a direct one (a same-node verdict allowed it, connect.c), its 4-tuple
 *    in dabba_direct, the proof the guard and the steering admit it by;
 *  - keep one flow record per socket in dabba_flows, its counters refreshed
 *    on every segment the socket sends (data or ACK), so live flows can be
 *    listed from the map;
 *  - at close, finish the record, send it to user space through the ring
 *    buffer and delete every entry the flow had;
 *  - for a connection to a service endpoint the capture chose (connect.c, dabba_sk_peer): the
 *    endpoint's open connections (least connections) and consecutive failed connects, and its
 *    ejection once it failed eject_after times in a row (dabba_lb_ep).
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/net.h>
#include <linux/socket.h>

#include "maps.h"

/* TCP header flag, as in the kernel's net/tcp.h (not a UAPI header). */
#define TCPHDR_FIN 0x01

/* Count n events of kind stat in dabba_stats (see include/maps.h). */
static __always_inline void count(u32 stat, u64 n)
{
	u64 *v = dabba_stats.lookup(&stat);
	if (v)
		*v += n;
}

static __always_inline struct dabba_sk_owner *owner_of(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 0;
	return dabba_sk_owner.sk_storage_get(sk, 0, 0);
}

/* The socket's own address and its peer's, either family (IPv4 as IPv4-mapped). */
static __always_inline struct dabba_ip6 local_of(struct bpf_sock_ops *skops)
{
	if (skops->family == AF_INET)
		return dabba_v4(skops->local_ip4);
	return DABBA_CTX_IP6(skops->local_ip6);
}

static __always_inline struct dabba_ip6 remote_of(struct bpf_sock_ops *skops)
{
	if (skops->family == AF_INET)
		return dabba_v4(skops->remote_ip4);
	return DABBA_CTX_IP6(skops->remote_ip6);
}

static __always_inline void refresh(struct bpf_sock_ops *skops, struct dabba_flow *f)
{
	u64 sent = skops->bytes_acked - f->base_acked;
	u64 received = skops->bytes_received - f->base_received;

	/*
	 * bytes_acked and bytes_received count sequence space, and a FIN
	 * takes one sequence number: take it out so the counts are payload.
	 * Our FIN is in bytes_acked once everything we sent is acknowledged.
	 */
	if ((f->seen & DABBA_SEEN_FIN_IN) && received > 0)
		received--;
	if ((f->seen & DABBA_SEEN_FIN_OUT) && skops->snd_una == skops->snd_nxt && sent > 0)
		sent--;
	f->bytes_sent = sent;
	f->bytes_received = received;
	f->segs_out = skops->segs_out;
	f->segs_in = skops->segs_in;
	f->retrans = skops->total_retrans;
	/* tcp_sock keeps srtt_us scaled by 8 */
	f->srtt_us = skops->srtt_us >> 3;
	f->last_ns = bpf_ktime_get_ns();
}

/*
 * A new flow record: at connect() for active opens, so a connection that is
 * refused is recorded too, and at ESTABLISHED for passive ones.
 */
static __always_inline void on_open(struct bpf_sock_ops *skops, u8 direction)
{
	struct dabba_sk_owner *own = owner_of(skops);
	if (!own)
		return;

	u64 cookie = bpf_get_socket_cookie(skops);
	struct dabba_flow f = {
	    .cookie = cookie,
	    .cgroup_id = own->cgroup_id,
	    .start_ns = bpf_ktime_get_ns(),
	    .src_ip = local_of(skops),
	    .dst_ip = remote_of(skops),
	    .src_port = (u16)skops->local_port,
	    .dst_port = bpf_ntohl(skops->remote_port),
	    .direction = direction,
	    .last_state = direction == DABBA_DIR_OUTBOUND ? BPF_TCP_SYN_SENT : BPF_TCP_ESTABLISHED,
	};
	f.orig_ip = f.dst_ip;
	f.orig_port = f.dst_port;

	if (direction == DABBA_DIR_OUTBOUND) {
		/*
		 * Publish the capture record under the 4-tuple before the SYN
		 * leaves, so it is there when the tunnel accepts.
		 */
		struct dabba_capture *cap = dabba_cap_ck.lookup(&cookie);
		struct dabba_direct *dir = cap ? 0 : dabba_direct_ck.lookup(&cookie);
		if (dir) {
			/*
			 * Straight to a workload of this node (connect.c): its 4-tuple is the
			 * proof the guard and the steering admit it by, until it closes.
			 */
			struct dabba_tuple t = {
			    .src_ip = f.src_ip,
			    .dst_ip = f.dst_ip,
			    .src_port = f.src_port,
			    .dst_port = f.dst_port,
			};
			dabba_direct.update(&t, dir);
			/* to a service's endpoint: the record keeps the VIP asked for */
			struct bpf_sock *sk = skops->sk;
			struct dabba_peer *p = sk ? dabba_sk_peer.sk_storage_get(sk, 0, 0) : 0;
			if (p && p->ep_port) {
				f.orig_ip = p->asked;
				f.orig_port = p->asked_port;
			}
			f.captured = DABBA_CAPTURED_DIRECT;
			f.rule = dir->rule;
			dabba_direct_ck.delete(&cookie);
		}
		if (cap) {
			struct dabba_tuple t = {
			    .src_ip = f.src_ip,
			    .dst_ip = f.dst_ip,
			    .src_port = f.src_port,
			    .dst_port = f.dst_port,
			};
			if (dabba_cap_tp.update(&t, cap) != 0)
				count(DABBA_ST_TUPLE_FULL, 1);
			f.orig_ip = cap->orig_ip;
			f.orig_port = cap->orig_port;
			f.captured = DABBA_CAPTURED_TUNNEL;
			dabba_cap_ck.delete(&cookie);
		}
	} else {
		f.base_acked = skops->bytes_acked;
		f.base_received = skops->bytes_received;
		/* the accepting end of a direct connection: its client published the 4-tuple */
		struct dabba_tuple t = {
		    .src_ip = f.dst_ip,
		    .dst_ip = f.src_ip,
		    .src_port = f.dst_port,
		    .dst_port = f.src_port,
		};
		struct dabba_direct *dir = dabba_direct.lookup(&t);
		if (dir) {
			f.captured = DABBA_CAPTURED_DIRECT;
			f.rule = dir->rule;
		}
	}

	if (dabba_flows.insert(&f.cookie, &f) != 0) {
		count(DABBA_ST_FLOW_FULL, 1);
		/* not accounted, but a captured one must still give back its tuple at close */
		if (f.captured)
			bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG);
		return;
	}
	count(DABBA_ST_FLOW_OPENED, 1);
	/*
	 * STATE_CB: every state change, for the close. WRITE_HDR_OPT_CB makes
	 * the kernel call us (HDR_OPT_LEN_CB) for every segment the socket
	 * sends, ACKs included, which keeps the live counters fresh for
	 * senders and receivers alike; we reserve no option space.
	 */
	bpf_sock_ops_cb_flags_set(skops,
				  BPF_SOCK_OPS_STATE_CB_FLAG | BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG);
}

/* An active open got its SYN-ACK: what is acked so far is the SYN, not payload. */
static __always_inline void on_active_established(struct bpf_sock_ops *skops)
{
	u64 cookie = bpf_get_socket_cookie(skops);
	struct dabba_flow *f = dabba_flows.lookup(&cookie);
	if (!f)
		return;
	f->base_acked = skops->bytes_acked;
	f->base_received = skops->bytes_received;
	f->last_state = BPF_TCP_ESTABLISHED;
	refresh(skops, f);
}

static __always_inline void on_close(struct bpf_sock_ops *skops, u32 old_state)
{
	u64 cookie = bpf_get_socket_cookie(skops);
	struct dabba_flow *f = dabba_flows.lookup(&cookie);

	/* A connect() that never got established still holds its capture record. */
	dabba_cap_ck.delete(&cookie);
	if (!f) {
		/* a captured connection the full flow map did not take: its tuple still goes */
		struct dabba_tuple t = {
		    .src_ip = local_of(skops),
		    .dst_ip = remote_of(skops),
		    .src_port = (u16)skops->local_port,
		    .dst_port = bpf_ntohl(skops->remote_port),
		};
		dabba_cap_tp.delete(&t);
		dabba_direct.delete(&t);
		return;
	}

	refresh(skops, f);

	if (old_state == BPF_TCP_SYN_SENT || old_state == BPF_TCP_SYN_RECV)
		f->close = DABBA_CLOSE_REFUSED;
	else if ((f->seen & DABBA_SEEN_FIN_IN) && (f->seen & DABBA_SEEN_FIN_OUT) &&
		 skops->snd_una == skops->snd_nxt)
		f->close = DABBA_CLOSE_FIN;
	else
		f->close = DABBA_CLOSE_RESET;
	f->end_ns = f->last_ns;
	f->last_state = BPF_TCP_CLOSE;

	if (f->captured) {
		struct dabba_tuple t = {
		    .src_ip = f->src_ip,
		    .dst_ip = f->dst_ip,
		    .src_port = f->src_port,
		    .dst_port = f->dst_port,
		};
		if (f->captured == DABBA_CAPTURED_TUNNEL)
			dabba_cap_tp.delete(&t);
		else if (f->direction == DABBA_DIR_OUTBOUND)
			dabba_direct.delete(&t); /* its proof goes with the client's socket */
	}
	if (dabba_flow_ev.ringbuf_output(f, sizeof(*f), 0) != 0)
		count(DABBA_ST_RING_DROP, 1);
	count(DABBA_ST_FLOW_CLOSED, 1);
	dabba_flows.delete(&cookie);
}

/* ---- services: the chosen endpoint's load and health (connect.c picks by them) ---- */

static __always_inline struct dabba_peer *lb_peer(struct bpf_sock_ops *skops)
{
	struct bpf_sock *sk = skops->sk;
	if (!sk)
		return 0;
	struct dabba_peer *p = dabba_sk_peer.sk_storage_get(sk, 0, 0);
	return p && p->ep_port ? p : 0;
}

/* The endpoint's state, created on first use. */
static __always_inline struct dabba_ep_state *lb_state(struct dabba_ip6 *ip, u16 port)
{
	struct dabba_ip_port k = {.ip = *ip, .port = port};
	struct dabba_ep_state *st = dabba_lb_ep.lookup(&k);
	if (st)
		return st;
	struct dabba_ep_state zero = {};
	dabba_lb_ep.insert(&k, &zero); /* another CPU may have inserted it first: either is it */
	return dabba_lb_ep.lookup(&k);
}

/* Established: one more open connection; its consecutive failures end, and, once out of an
 * ejection, the backoff too. */
static __always_inline void lb_established(struct bpf_sock_ops *skops)
{
	struct dabba_peer *p = lb_peer(skops);
	if (!p || p->counted)
		return;
	struct dabba_ep_state *st = lb_state(&p->ep, p->ep_port);
	if (!st)
		return;
	__sync_fetch_and_add(&st->active, 1);
	p->counted = 1;
	st->failures = 0;
	if (st->ejected_until <= bpf_ktime_get_ns())
		st->ejections = 0;
}

/*
 * A connect that never established: one more consecutive failure; at eject_after of them the
 * endpoint is ejected for eject_ms, doubled on each ejection in a row (at most 10x), unless
 * max_ejected_pct of its service's endpoints would then be out (they stay in; counted).
 */
static __always_inline void lb_failed(struct dabba_peer *p)
{
	struct dabba_ep_state *st = lb_state(&p->ep, p->ep_port);
	if (!st)
		return;
	count(DABBA_ST_LB_FAILED, 1);
	__sync_fetch_and_add(&st->failures, 1);
	u32 failures = st->failures;
	u32 zero = 0;
	struct dabba_config *cfg = dabba_cfg.lookup(&zero);
	u64 now = bpf_ktime_get_ns();
	if (!cfg || !cfg->eject_after || failures < cfg->eject_after || st->ejected_until > now)
		return;
	u32 n = p->svc_count, out = 0;
	for (u32 i = 0; i < DABBA_SVC_EP_MAX; i++) {
		asm volatile(
		    ""
		    : "+r"(i)); /* keeps the constant bound the verifier needs (connect.c) */
		if (i >= n)
			break;
		struct dabba_svc_slot s = {.id = p->svc_id, .slot = i};
		struct dabba_ip6 *ip = dabba_svc_ep.lookup(&s);
		if (!ip || dabba_ip_eq(ip, &p->ep))
			continue;
		struct dabba_ip_port k = {.ip = *ip, .port = p->ep_port};
		struct dabba_ep_state *o = dabba_lb_ep.lookup(&k);
		if (o && o->ejected_until > now)
			out++;
	}
	if ((out + 1) * 100 > (u32)cfg->max_ejected_pct * n) {
		count(DABBA_ST_LB_EJECT_LIMIT, 1);
		return;
	}
	u32 times = st->ejections >= 4 ? 10 : 1 << st->ejections; /* 1, 2, 4, 8, then 10 */
	st->ejected_until = now + (u64)cfg->eject_ms * 1000000ULL * times;
	st->ejections++;
	st->failures = 0;
	count(DABBA_ST_LB_EJECTED, 1);
}

/* Closed: an open connection less, or a failed connect. */
static __always_inline void lb_closed(struct bpf_sock_ops *skops, u32 old_state)
{
	struct dabba_peer *p = lb_peer(skops);
	if (!p)
		return;
	if (p->counted) {
		struct dabba_ip_port k = {.ip = p->ep, .port = p->ep_port};
		struct dabba_ep_state *st = dabba_lb_ep.lookup(&k);
		if (st && st->active)
			__sync_fetch_and_sub(&st->active, 1);
		p->counted = 0;
	} else if (old_state == BPF_TCP_SYN_SENT) {
		lb_failed(p);
	}
}

static __always_inline void on_state(struct bpf_sock_ops *skops)
{
	u32 old_state = skops->args[0];
	u32 new_state = skops->args[1];

	if (new_state == BPF_TCP_CLOSE) {
		lb_closed(skops, old_state);
		on_close(skops, old_state);
		return;
	}

	u64 cookie = bpf_get_socket_cookie(skops);
	struct dabba_flow *f = dabba_flows.lookup(&cookie);
	if (!f)
		return;
	switch (new_state) {
	case BPF_TCP_CLOSE_WAIT: /* the peer's FIN, we had not closed */
	case BPF_TCP_CLOSING:	 /* the peer's FIN after ours */
		f->seen |= DABBA_SEEN_FIN_IN;
		break;
	case BPF_TCP_FIN_WAIT1: /* our FIN first */
		/*
		 * From here the peer's FIN takes the socket from FIN_WAIT2 straight
		 * to CLOSE (it becomes a timewait socket), and so does a reset: the
		 * states cannot tell them apart. Look at the segments themselves
		 * (PARSE_HDR_OPT_CB, every valid incoming segment) for this socket
		 * from now on.
		 */
		f->seen |= DABBA_SEEN_FIN_OUT;
		bpf_sock_ops_cb_flags_set(skops, BPF_SOCK_OPS_STATE_CB_FLAG |
						     BPF_SOCK_OPS_WRITE_HDR_OPT_CB_FLAG |
						     BPF_SOCK_OPS_PARSE_ALL_HDR_OPT_CB_FLAG);
		break;
	case BPF_TCP_LAST_ACK: /* our FIN after the peer's */
		f->seen |= DABBA_SEEN_FIN_OUT;
		break;
	}
	f->last_state = new_state;
}

/*
 * TCP of both families. An AF_INET6 socket connected over IPv4 (an
 * IPv4-mapped peer) has IPv4-mapped local_ip6 and remote_ip6: the addresses
 * an AF_INET socket's are mapped to, so it is accounted exactly like one.
 */
static __always_inline int ip_flow(struct bpf_sock_ops *skops)
{
	return skops->family == AF_INET || skops->family == AF_INET6;
}

int dabba_sockops(struct bpf_sock_ops *skops)
{
	if (!ip_flow(skops))
		return 1;

	switch (skops->op) {
	case BPF_SOCK_OPS_TCP_CONNECT_CB:
		on_open(skops, DABBA_DIR_OUTBOUND);
		/* to a service endpoint: its close, or its failed connect, must be seen */
		if (lb_peer(skops))
			bpf_sock_ops_cb_flags_set(skops, skops->bpf_sock_ops_cb_flags |
							     BPF_SOCK_OPS_STATE_CB_FLAG);
		break;
	case BPF_SOCK_OPS_ACTIVE_ESTABLISHED_CB:
		lb_established(skops);
		on_active_established(skops);
		break;
	case BPF_SOCK_OPS_PASSIVE_ESTABLISHED_CB:
		on_open(skops, DABBA_DIR_INBOUND);
		break;
	case BPF_SOCK_OPS_HDR_OPT_LEN_CB: {
		u64 cookie = bpf_get_socket_cookie(skops);
		struct dabba_flow *f = dabba_flows.lookup(&cookie);
		if (f)
			refresh(skops, f);
		break;
	}
	case BPF_SOCK_OPS_PARSE_HDR_OPT_CB:
		/* enabled only after our FIN (on_state): did the peer's FIN come? */
		if (skops->skb_tcp_flags & TCPHDR_FIN) {
			u64 cookie = bpf_get_socket_cookie(skops);
			struct dabba_flow *f = dabba_flows.lookup(&cookie);
			if (f)
				f->seen |= DABBA_SEEN_FIN_IN;
		}
		break;
	case BPF_SOCK_OPS_STATE_CB:
		on_state(skops);
		break;
	}
	return 1;
}
