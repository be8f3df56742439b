// SPDX-License-Identifier: GPL-2.0
/*
 * Owner tag: cgroup/sock_create.
 *
 * Runs in the creating process's context, the one place where the
 * workload's cgroup is known for every socket it will own, including the
 * listeners whose accepted sockets inherit the tag (BPF_F_CLONE). sockops
 * (sockops.c) accounts only sockets carrying the tag.
 */
#include <uapi/linux/bpf.h>
#include <uapi/linux/in.h>
#include <linux/net.h>
#include <linux/socket.h>

#include "maps.h"

int dabba_sock_new(struct bpf_sock *sk)
{
	if (sk->family != AF_INET || sk->protocol != IPPROTO_TCP)
		return 1;

	u64 cg = bpf_get_current_cgroup_id();
	struct dabba_workload *wl = dabba_wl.lookup(&cg);
	if (!wl || !(wl->flags & DABBA_WL_ACCOUNT))
		return 1;

	struct dabba_sk_owner *own =
	    dabba_sk_owner.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (own)
		own->cgroup_id = cg;
	return 1;
}
