/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Types shared between the eBPF programs and user space.
 *
 * This header is the source of truth: agent/bpf/abi.py mirrors each struct
 * with ctypes (quoting it) so that the tunnel can read pinned maps without
 * bcc, and tests/kernel/test_abi.py checks sizes and offsets against the
 * types bcc derives from this file. Fields are ordered by size so that no
 * struct has implicit padding.
 *
 * Addresses are struct dabba_ip6 in network byte order: IPv6 as it is, IPv4 as
 * IPv4-mapped (::ffff:a.b.c.d), so that one map, key or record serves both
 * families (dabba_config.tunnel_ip and the IPv4 exclusions excepted); ports
 * are in host byte order.
 */
#ifndef DABBA_TYPES_H
#define DABBA_TYPES_H

/* dabba_wl: value, keyed by the workload's cgroup v2 id (u64). */
#define DABBA_WL_CAPTURE 0x1 /* redirect its connect() to the tunnel */
#define DABBA_WL_STRICT	 0x2 /* ingress guard: only the tunnel may connect */
#define DABBA_WL_ACCOUNT 0x4 /* keep flow records */

struct dabba_workload {
	__u32 id;    /* agent's workload index, for user space only */
	__u32 flags; /* DABBA_WL_* */
};

/* dabba_sk_owner: socket-local storage, set when an enrolled workload
 * creates a socket. */
struct dabba_sk_owner {
	__u64 cgroup_id;
};

/*
 * An address of either family, in network order: IPv6 as it is, IPv4 as
 * IPv4-mapped (::ffff:a.b.c.d). Also dabba_node_ip's key (the node's own
 * addresses) and dabba_tun_addr's (the tunnel's sources).
 */
struct dabba_ip6 {
	__u32 w[4];
};

/* dabba_config.flags */
/* enrolled workloads' UDP, raw and other non-TCP sockets pass unmeshed (else: DNS only) */
#define DABBA_CFG_PASS_NON_TCP 0x1

/* dabba_cfg: the one entry of the node's runtime configuration. */
struct dabba_config {
	__u32 tunnel_ip;   /* outbound listener the capture rewrites to */
	__u16 tunnel_port; /* its port */
	__u16 enabled;	   /* 0 disables capture (connections go direct) */
	__u32 tunnel_mark; /* SO_MARK of the tunnel's own sockets: never captured */
	__u16 flags;	   /* DABBA_CFG_* */
	__u16 hbone_port;  /* the tunnel's HBONE listener (own.c); 0: not owned */
	__u32 max_open;	   /* captured connections one workload may hold open; 0: no limit */
	__u32 _pad;
	/* the outbound listener native IPv6 is rewritten to (its port: tunnel_port); all zero:
	 * the tunnel has no IPv6 address, and native IPv6 is refused (DABBA_REFUSED_IPV6) */
	struct dabba_ip6 tunnel_ip6;
	/* the generation of dabba_verdicts in force (same-node verdicts); 0: none, the tunnel
	 * decides every connection */
	__u32 verdict_gen;
	/* services in the kernel (connect.c, sockops.c): outlier ejection after eject_after
	 * consecutive failed connects to an endpoint, for eject_ms (doubled on each ejection,
	 * at most 10x), never more than max_ejected_pct of a service's endpoints at once */
	__u16 eject_after;
	__u16 max_ejected_pct;
	__u32 eject_ms;
	/* a captured connect() goes to tunnel_ip:(spread_base + a random one of spread_count),
	 * which own.c hands to the outbound listener (0: to tunnel_port). One destination for
	 * all of a workload's captured connections would let its closed ones (TIME_WAIT, 60 s)
	 * take every local port: at most ~28,000 connections a minute, then EADDRNOTAVAIL */
	__u16 spread_base;
	__u16 spread_count;
};

/* Why the kernel refused a workload's connect() (dabba_flow.refused). */
enum dabba_refusal {
	DABBA_REFUSED_NONE = 0,
	DABBA_REFUSED_LINK_LOCAL = 1, /* 169.254.0.0/16, fe80::/10: the node's link, not the mesh */
	DABBA_REFUSED_NODE = 2,	      /* an address of the node itself (dabba_node_ip) */
	DABBA_REFUSED_MESH_PORT = 3,  /* one of the mesh's own ports (dabba_mesh_port) */
	DABBA_REFUSED_IPV6 = 4,	      /* native IPv6, and the tunnel has no IPv6 address */
	DABBA_REFUSED_CAP_FULL = 5,   /* the capture map was full */
	DABBA_REFUSED_LIMIT = 6,      /* the workload holds max_open captured connections */
	DABBA_REFUSED_POLICY = 7,     /* a same-node verdict (dabba_verdicts) denies it */
	DABBA_REFUSED_NO_ENDPOINT = 8, /* a service (dabba_svc) with no endpoint: ECONNREFUSED */
};

/*
 * Services in the kernel (connect.c), like Cilium's socket-level load balancing: connect() to
 * a service's virtual IP and port is resolved to one of its endpoints before anything else
 * is decided, and the connection is then exactly one to that endpoint (direct on this node
 * when a verdict allows it, else through the tunnel, which is told the service).
 *
 * dabba_svc: key, a virtual IP and one of its ports (host order).
 */
struct dabba_svc_key {
	struct dabba_ip6 vip;
	__u16 port;
	__u16 _pad;
};

/* dabba_svc.policy */
#define DABBA_LB_ROUND_ROBIN 0
#define DABBA_LB_LEAST_CONN  1
#define DABBA_LB_RANDOM	     2

/* At most this many endpoints per service in the kernel (the agent leaves bigger ones to the
 * tunnel, saying so). */
#define DABBA_SVC_EP_MAX 64

/*
 * dabba_svc: value. Its endpoints are dabba_svc_ep's (id, 0) .. (id, count - 1): the agent
 * writes a new set under a new id, then this entry (one update, atomic), then removes the old
 * set, so that a connect() finds either set whole.
 */
struct dabba_svc {
	__u32 id;
	__u32 rr; /* round-robin cursor, shared by the node's connect()s */
	__u16 count;
	__u16 target_port; /* the endpoints' port (host order) */
	__u8 policy;	   /* DABBA_LB_* */
	__u8 _pad[3];
};

/* dabba_svc_ep: key; the value is the endpoint's address (struct dabba_ip6). */
struct dabba_svc_slot {
	__u32 id;
	__u32 slot;
};

/*
 * dabba_lb_ep: value, by endpoint (struct dabba_ip_port: its address and target port). Its
 * load and health as this node sees them: open connections (least connections) and
 * consecutive failed connects (outlier ejection), kept by sockops.
 */
struct dabba_ep_state {
	__u64 active;	     /* connections of this node's workloads open to it */
	__u64 ejected_until; /* bpf_ktime_get_ns(); 0 or past: not ejected */
	__u32 failures;	     /* consecutive connects that never established */
	__u32 ejections;     /* in a row (the backoff); a success after the ejection resets it */
};

/*
 * dabba_sk_peer: socket-local storage of a socket whose connect() the kernel resolved or
 * rewrote. getpeername() gives back what the workload asked for (a VIP, or the destination
 * the capture took to the tunnel), not where it went; sockops keeps the chosen endpoint's
 * load and health.
 */
struct dabba_peer {
	struct dabba_ip6 asked; /* the address connect() was given */
	struct dabba_ip6 to;	/* where the connection went instead */
	struct dabba_ip6 ep;	/* the service endpoint chosen (with ep_port 0: none) */
	__u32 svc_id;		/* its service's endpoint set (dabba_svc.id) */
	__u16 asked_port;
	__u16 to_port;
	__u16 ep_port;
	__u16 svc_count; /* endpoints in that set */
	__u8 counted;	 /* 1: established, counted in its endpoint's active connections */
	__u8 _pad[7];
};

/*
 * dabba_verdicts: key. A same-node verdict, compiled by the agent from the Istio
 * AuthorizationPolicy set (agent/node/verdicts.py): the source workload (cgroup id), the
 * destination workload's address, the port (0: every port without an entry of its own), and
 * the generation it belongs to (dabba_config.verdict_gen is the one in force).
 */
struct dabba_verdict_key {
	__u64 cgroup_id;
	struct dabba_ip6 dst;
	__u32 gen;
	__u16 port;
	__u16 _pad;
};

/* dabba_verdicts: value. */
struct dabba_verdict {
	__u32 rule; /* the agent's index of the decision (policy, rule, reason), from 1 */
	__u8 allow;
	__u8 _pad[3];
};

/*
 * dabba_direct_ck (by socket cookie, from connect() to TCP_CONNECT_CB) and dabba_direct (by
 * the client's 4-tuple, until it closes): a same-node connection a verdict let go straight to
 * its destination. The guard and the plaintext steering admit it by its 4-tuple.
 */
struct dabba_direct {
	__u64 cgroup_id; /* the source workload */
	__u32 rule;	 /* the verdict that allowed it */
	__u32 _pad;
};

/*
 * dabba_port_mtls: key. A local workload's address (network order) and one
 * of its ports (host order) with a PeerAuthentication mode of its own
 * (Istio's portLevelMtls), or port 0: the workload's own mode, for its other
 * ports (written for workloads with port modes only). Value: DABBA_MTLS_*.
 */
struct dabba_ip_port {
	struct dabba_ip6 ip;
	__u16 port;
	__u16 _pad;
};
#define DABBA_MTLS_STRICT    1 /* only the tunnel may connect (the guard drops the rest) */
#define DABBA_MTLS_PLAINTEXT 2 /* PERMISSIVE or DISABLE: plaintext through the tunnel's 15006 */

/* dabba_tun_sk: keys (own.c) */
#define TUN_SK_OUTBOUND	 0 /* tunnel_ip:tunnel_port */
#define TUN_SK_HBONE	 1 /* any address, hbone_port (IPv4) */
#define TUN_SK_OUTBOUND6 2 /* tunnel_ip6:tunnel_port */

/* dabba_cap_ck (by socket cookie) and dabba_cap_tp (by 4-tuple): value. */
struct dabba_capture {
	__u64 cgroup_id;	  /* kernel-attested source workload (caller's cgroup) */
	__u64 cookie;		  /* socket cookie of the workload's socket */
	struct dabba_ip6 orig_ip; /* original destination (a service's: the endpoint chosen) */
	struct dabba_ip6 svc_ip;  /* the service's VIP the kernel resolved, with svc_port != 0 */
	__u16 orig_port;
	__u16 svc_port;
	__u32 _pad;
};

/*
 * dabba_cap_tp: key. The 4-tuple of the workload's socket after the rewrite,
 * which is the tunnel's accepted socket seen from the other end: src is the
 * workload (the tunnel's peer), dst is the tunnel's outbound listener.
 */
struct dabba_tuple {
	struct dabba_ip6 src_ip;
	struct dabba_ip6 dst_ip;
	__u16 src_port;
	__u16 dst_port;
};

/*
 * dabba_excl_net: LPM trie key for excluded destination CIDRs, both families
 * (an IPv4 CIDR as its IPv4-mapped form: prefixlen + 96).
 */
struct dabba_lpm {
	__u32 prefixlen;
	struct dabba_ip6 ip;
};

enum dabba_direction {
	DABBA_DIR_OUTBOUND = 1, /* the workload connected (active open) */
	DABBA_DIR_INBOUND = 2,	/* the workload accepted (passive open) */
};

enum dabba_close {
	DABBA_CLOSE_OPEN = 0,	 /* still open */
	DABBA_CLOSE_FIN = 1,	 /* orderly: FIN both ways */
	DABBA_CLOSE_RESET = 2,	 /* aborted from ESTABLISHED/CLOSE_WAIT: RST or timeout */
	DABBA_CLOSE_REFUSED = 3, /* never established (connect failed) */
	DABBA_CLOSE_HALF = 4,	 /* closed after our FIN without the peer's (FIN_WAIT1) */
};

/* Bits in dabba_flow.seen: TCP events noted by the state callback. */
#define DABBA_SEEN_FIN_IN  0x1 /* the peer's FIN was received */
#define DABBA_SEEN_FIN_OUT 0x2 /* our FIN was sent */

/*
 * dabba_flows: value, keyed by the workload socket's cookie; also the record
 * sent through dabba_flow_ev when the flow closes (end_ns != 0).
 */
struct dabba_flow {
	__u64 cookie;
	__u64 cgroup_id;
	__u64 start_ns;	      /* CLOCK_MONOTONIC (bpf_ktime_get_ns) at ESTABLISHED */
	__u64 last_ns;	      /* last update of the counters */
	__u64 end_ns;	      /* at close; 0 while open */
	__u64 bytes_sent;     /* payload bytes the peer acknowledged */
	__u64 bytes_received; /* payload bytes received in order */
	__u64 base_acked;     /* tcp bytes_acked at ESTABLISHED (the SYN) */
	__u64 base_received;  /* tcp bytes_received at ESTABLISHED */
	__u32 segs_out;
	__u32 segs_in;
	__u32 retrans;		  /* total retransmitted segments */
	__u32 srtt_us;		  /* smoothed RTT, microseconds */
	struct dabba_ip6 src_ip;  /* the workload socket's own address */
	struct dabba_ip6 dst_ip;  /* its peer as connected (the tunnel when captured) */
	struct dabba_ip6 orig_ip; /* original destination when captured, else dst_ip */
	__u16 src_port;
	__u16 dst_port;
	__u16 orig_port;
	__u8 direction; /* enum dabba_direction */
	__u8 close;	/* enum dabba_close */
	__u8 captured;	/* DABBA_CAPTURED_*: to the tunnel, direct, or 0 (neither) */
	__u8 seen;	/* DABBA_SEEN_* */
	__u8 last_state;
	__u8 refused; /* enum dabba_refusal: connect() refused in the kernel, never sent */
	__u32 rule;   /* the same-node verdict of a direct or policy-refused connect(), else 0 */
};

/* dabba_flow.captured */
#define DABBA_CAPTURED_TUNNEL 1 /* connect() was redirected to the tunnel */
#define DABBA_CAPTURED_DIRECT 2 /* a same-node verdict let it go straight to its destination */

/* dabba_stats: per-CPU counters, indexed by this enum. */
enum dabba_stat {
	DABBA_ST_CAPTURED = 0,	/* connect() redirected to the tunnel */
	DABBA_ST_EXCLUDED,	/* enrolled, but destination excluded */
	DABBA_ST_CAP_FULL,	/* dabba_cap_ck full: connect() refused */
	DABBA_ST_TUPLE_FULL,	/* dabba_cap_tp full: tunnel cannot resolve */
	DABBA_ST_FLOW_OPENED,	/* flow records created */
	DABBA_ST_FLOW_CLOSED,	/* flow records closed */
	DABBA_ST_FLOW_FULL,	/* dabba_flows full: flow not accounted */
	DABBA_ST_RING_DROP,	/* closed-flow ring full: record lost */
	DABBA_ST_GUARD_DROP,	/* ingress guard drops, all workloads */
	DABBA_ST_SPLICE_BYTES,	/* unused (the sockmap splice's bytes; the tunnel counts its own) */
	DABBA_ST_SPLICE_PASS,	/* unused (the sockmap splice's segments without a peer) */
	DABBA_ST_PLAIN_STEERED, /* plaintext connections steered to the tunnel's 15006 */
	DABBA_ST_PLAIN_NO_TUNNEL, /* ...refused: no 15006 listener for that workload (fail closed)
				   */
	DABBA_ST_LOCAL, /* connect() to loopback or unspecified: stays in the caller's netns */
	DABBA_ST_DST_REFUSED,	 /* connect() refused: link-local, the node itself, a mesh port */
	DABBA_ST_V6_REFUSED,	 /* connect() to a native IPv6 address refused (not meshed) */
	DABBA_ST_PROTO_REFUSED,	 /* non-TCP socket or datagram refused (only DNS leaves) */
	DABBA_ST_PLAIN_V6_DROP,	 /* IPv6 plaintext to a PERMISSIVE workload dropped */
	DABBA_ST_OWN_NO_TUNNEL,	 /* connection to the tunnel's ports refused: it is not listening */
	DABBA_ST_FAMILY_SEEN,	 /* sockets of a family with no path through the mesh (family.c),
				    anyone's: the agent's probe that lsm/socket_create runs */
	DABBA_ST_FAMILY_REFUSED, /* ...refused to an enrolled workload: packet, XDP, vsock, ... */
	DABBA_ST_LSM_FAILED,	 /* lsm/socket_create could not be loaded or attached (set by the
				    agent; the load is not tried again until the pins go) */
	DABBA_ST_LIMIT_REFUSED,	 /* connect() refused: the workload holds max_open connections */
	DABBA_ST_DIRECT, /* connect() went straight to a workload of this node (a verdict) */
	DABBA_ST_POLICY_REFUSED,  /* connect() refused by a same-node verdict */
	DABBA_ST_GUARD_DIRECT,	  /* connections the guard or the steering admitted as direct */
	DABBA_ST_SVC_RESOLVED,	  /* connect() to a service VIP resolved to an endpoint */
	DABBA_ST_SVC_NO_ENDPOINT, /* ...refused: the service has no endpoint (ECONNREFUSED) */
	DABBA_ST_LB_FAILED,	  /* connects to a service endpoint that never established */
	DABBA_ST_LB_EJECTED,	  /* endpoints ejected (outlier detection) */
	DABBA_ST_LB_EJECT_LIMIT,  /* ...not ejected: the service was at its ejection limit */
	DABBA_ST_MAX,
};

#endif /* DABBA_TYPES_H */
