/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Every map of a node, pinned under DABBA_PIN_MAPS.
 *
 * All programs of a node share these maps: whichever program is compiled
 * first creates and pins them, the others open the pins (bcc's
 * "<type>:<path>" section). A restarted agent finds them pinned and adopts
 * them with their contents, so capture and accounting never stop.
 *
 * Names share the dabba_ prefix and stay within the kernel's 15 characters;
 * agent/bpf/names.py holds the same names for user space.
 */
#ifndef DABBA_MAPS_H
#define DABBA_MAPS_H

#include "config.h"
#include "types.h"
#include "addr.h"

#define DABBA_PIN(name) DABBA_PIN_MAPS #name

BPF_TABLE_PINNED("array", u32, struct dabba_config, dabba_cfg, 1, DABBA_PIN(dabba_cfg));
BPF_TABLE_PINNED("hash", u64, struct dabba_workload, dabba_wl, DABBA_WL_MAX, DABBA_PIN(dabba_wl));
BPF_TABLE_PINNED("lpm_trie", struct dabba_lpm, u8, dabba_excl_net, DABBA_EXCL_MAX,
		 DABBA_PIN(dabba_excl_net), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u16, u8, dabba_excl_port, DABBA_EXCL_MAX, DABBA_PIN(dabba_excl_port));
BPF_TABLE_PINNED("hash", u64, struct dabba_capture, dabba_cap_ck, DABBA_CAP_MAX,
		 DABBA_PIN(dabba_cap_ck));
BPF_TABLE_PINNED("hash", struct dabba_tuple, struct dabba_capture, dabba_cap_tp, DABBA_CAP_MAX,
		 DABBA_PIN(dabba_cap_tp));
BPF_TABLE_PINNED("hash", u64, struct dabba_flow, dabba_flows, DABBA_FLOW_MAX,
		 DABBA_PIN(dabba_flows));
BPF_TABLE_PINNED("percpu_array", u32, u64, dabba_stats, DABBA_ST_MAX, DABBA_PIN(dabba_stats));
BPF_TABLE_PINNED("hash", struct dabba_ip6, u8, dabba_tun_addr, DABBA_TUN_ADDR_MAX,
		 DABBA_PIN(dabba_tun_addr));
/*
 * Connections the tunnel opened from a tunnel address, by 4-tuple
 * (tunops.c): the only ones the guard and the steering take as the tunnel's.
 */
BPF_TABLE_PINNED("lru_hash", struct dabba_tuple, u8, dabba_tun_conn, DABBA_FLOW_MAX,
		 DABBA_PIN(dabba_tun_conn));
/* Addresses of the node itself: never a destination of its workloads. */
BPF_TABLE_PINNED("hash", struct dabba_ip6, u8, dabba_node_ip, DABBA_TUN_ADDR_MAX,
		 DABBA_PIN(dabba_node_ip));
/* Per-port PeerAuthentication modes of local workloads (portLevelMtls), by each address. */
BPF_TABLE_PINNED("hash", struct dabba_ip_port, u8, dabba_port_mtls, 2 * DABBA_WL_MAX,
		 DABBA_PIN(dabba_port_mtls));
/* The mesh's own ports (15000, 15001, 15006, 15008): never a destination of its workloads. */
BPF_TABLE_PINNED("hash", u16, u8, dabba_mesh_port, 16, DABBA_PIN(dabba_mesh_port));
BPF_TABLE_PINNED("hash", u64, u64, dabba_guard_ct, DABBA_WL_MAX, DABBA_PIN(dabba_guard_ct));
/*
 * Open captured connections: the workload cgroup of each, by socket cookie (from connect()
 * until the socket is released, sock.c), and how many each workload holds (max_open).
 */
BPF_TABLE_PINNED("hash", u64, u64, dabba_cap_open, DABBA_CAP_MAX, DABBA_PIN(dabba_cap_open));
BPF_TABLE_PINNED("hash", u64, u64, dabba_wl_open, DABBA_WL_MAX, DABBA_PIN(dabba_wl_open));
/* Same-node verdicts (connect.c), and the connections they let go direct (sockops.c). */
BPF_TABLE_PINNED("hash", struct dabba_verdict_key, struct dabba_verdict, dabba_verdicts,
		 DABBA_VERDICT_MAX, DABBA_PIN(dabba_verdicts), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", u64, struct dabba_direct, dabba_direct_ck, DABBA_CAP_MAX,
		 DABBA_PIN(dabba_direct_ck));
BPF_TABLE_PINNED("lru_hash", struct dabba_tuple, struct dabba_direct, dabba_direct, DABBA_FLOW_MAX,
		 DABBA_PIN(dabba_direct));
/* Services in the kernel (connect.c): VIPs, their endpoint sets, endpoints' load and health. */
BPF_TABLE_PINNED("hash", struct dabba_svc_key, struct dabba_svc, dabba_svc, DABBA_SVC_MAX,
		 DABBA_PIN(dabba_svc));
BPF_TABLE_PINNED("hash", struct dabba_svc_slot, struct dabba_ip6, dabba_svc_ep, DABBA_SVC_EP_SLOTS,
		 DABBA_PIN(dabba_svc_ep), BPF_F_NO_PREALLOC);
BPF_TABLE_PINNED("hash", struct dabba_ip_port, struct dabba_ep_state, dabba_lb_ep,
		 DABBA_SVC_EP_SLOTS, DABBA_PIN(dabba_lb_ep));
/* What a socket's connect() asked for and where it went (getpeername, the endpoint's load). */
BPF_TABLE_PINNED("sk_storage", int, struct dabba_peer, dabba_sk_peer, 0, DABBA_PIN(dabba_sk_peer),
		 BPF_F_NO_PREALLOC);
/*
 * Socket-local storage: the workload cgroup id of every socket an enrolled
 * workload creates (sock.c). sockops runs in softirq context where the
 * current cgroup means nothing, so it reads the owner from here.
 * BPF_F_CLONE copies it from a listener to the sockets it accepts.
 */
BPF_TABLE_PINNED("sk_storage", int, struct dabba_sk_owner, dabba_sk_owner, 0,
		 DABBA_PIN(dabba_sk_owner), BPF_F_NO_PREALLOC | BPF_F_CLONE);

/*
 * bcc's BPF_RINGBUF_OUTPUT and BPF_SOCKHASH have no pinned form in 0.26; these
 * are the same declarations with the pin path in the section name.
 */
struct dabba_flow_ev_table_t {
	int key;
	u32 leaf;
	int (*ringbuf_output)(void *, u64, u64);
	void *(*ringbuf_reserve)(u64);
	void (*ringbuf_discard)(void *, u64);
	void (*ringbuf_submit)(void *, u64);
	u32 max_entries;
};
__attribute__((section(
    "maps/ringbuf:" DABBA_PIN(dabba_flow_ev)))) struct dabba_flow_ev_table_t dabba_flow_ev = {
    .max_entries = DABBA_RING_PAGES * PAGE_SIZE};

/*
 * The tunnel's plaintext listener (15006) inside each PERMISSIVE or DISABLE
 * workload's network namespace, keyed by each of the workload's addresses
 * (struct dabba_ip6): where plain.c steers plaintext connections.
 */
struct dabba_plain_table_t {
	struct dabba_ip6 key;
	int leaf;
	int *(*lookup)(struct dabba_ip6 *);
	int (*update)(struct dabba_ip6 *, int *);
	int (*delete)(struct dabba_ip6 *);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" DABBA_PIN(
    dabba_plain)))) struct dabba_plain_table_t dabba_plain = {.max_entries = 2 * DABBA_WL_MAX};
BPF_ANNOTATE_KV_PAIR(dabba_plain, struct dabba_ip6, int);

/*
 * The tunnel's own listening sockets in the node's network namespace (TUN_SK_*):
 * its outbound (capture) listeners, IPv4 and IPv6, and its HBONE listener. own.c gives every
 * connection to those ports to these sockets and no other.
 */
struct dabba_tun_sk_table_t {
	u32 key;
	int leaf;
	int *(*lookup)(u32 *);
	int (*update)(u32 *, int *);
	int (*delete)(u32 *);
	u32 max_entries;
};
__attribute__((section("maps/sockhash:" DABBA_PIN(
    dabba_tun_sk)))) struct dabba_tun_sk_table_t dabba_tun_sk = {.max_entries = 3};
BPF_ANNOTATE_KV_PAIR(dabba_tun_sk, u32, int);

/*
 * Map method calls (map.lookup() and friends) must be written in the .c
 * file bcc compiles: bcc rewrites them only there, and refuses them inside
 * macros. So each program defines its own small count() over dabba_stats.
 */

#endif /* DABBA_MAPS_H */
