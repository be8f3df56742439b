// SPDX-License-Identifier: GPL-2.0
/*
 * Socket families: lsm/socket_create (BPF LSM).
 *
 * The cgroup hooks (sock.c, connect.c) see inet sockets only. A workload
 * holding CAP_NET_RAW could open a packet socket (AF_PACKET, or the
 * obsolete AF_INET SOCK_PACKET, which the kernel turns into one before this
 * hook) and write frames of its own: plaintext to other nodes, with no
 * capture, no identity and no flow record. Here an enrolled, capturing
 * workload gets EPERM for every family that has no path through the mesh
 * (packet, XDP, vsock, CAN, ...), counted; local IPC (unix), netlink
 * (its own namespace's configuration), AF_ALG (crypto) and the inet
 * families (sock.c and connect.c decide those) stay allowed.
 *
 * The BPF LSM runs only where the kernel has it active (CONFIG_BPF_LSM and
 * "bpf" in lsm=). The agent knows it runs because every socket of a refused
 * family, anyone's, is counted (DABBA_ST_FAMILY_SEEN): it opens one itself
 * and looks (control.py, packet_sockets_refused). Where the kernel cannot,
 * the agent does not start unless its config accepts it
 * (capture.packet_sockets).
 */
#include <uapi/linux/bpf.h>
#include <linux/socket.h>
#include <linux/errno.h>

#include "workload.h"

/* include/workload.h: bcc rewrites map calls in this file only */
static __always_inline struct dabba_workload *dabba_wl_get(u64 *id)
{
	return dabba_wl.lookup(id);
}

static __always_inline void count(u32 stat)
{
	u64 *v = dabba_stats.lookup(&stat);
	if (v)
		*v += 1;
}

LSM_PROBE(socket_create, int family, int type, int protocol, int kern)
{
	if (kern)
		return 0;
	if (family == AF_UNIX || family == AF_INET || family == AF_INET6 || family == AF_NETLINK ||
	    family == AF_ALG)
		return 0;
	count(DABBA_ST_FAMILY_SEEN);

	u64 cg = 0;
	struct dabba_workload *wl = dabba_current_workload(&cg);
	if (!wl || !(wl->flags & DABBA_WL_CAPTURE))
		return 0;
	u32 zero = 0;
	struct dabba_config *cfg = dabba_cfg.lookup(&zero);
	if (!cfg || !cfg->enabled || (cfg->flags & DABBA_CFG_PASS_NON_TCP))
		return 0;
	count(DABBA_ST_FAMILY_REFUSED);
	return -EPERM;
}
