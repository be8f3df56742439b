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

#include "workload.h"

/* include/workload.h: bcc rewrites map calls in this file only */
static __always_inline struct dabba_workload *dabba_wl_get(u64 *id)
{
	return dabba_wl.lookup(id);
}

int dabba_sock_new(struct bpf_sock *sk)
{
	if (sk->family != AF_INET || sk->protocol != IPPROTO_TCP)
		return 1;

	u64 cg = 0;
	struct dabba_workload *wl = dabba_current_workload(&cg);
	if (!wl || !(wl->flags & DABBA_WL_ACCOUNT))
		return 1;

	struct dabba_sk_owner *own =
	    dabba_sk_owner.sk_storage_get(sk, 0, BPF_SK_STORAGE_GET_F_CREATE);
	if (own)
		own->cgroup_id = cg;
	return 1;
}
