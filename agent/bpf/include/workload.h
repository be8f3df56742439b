/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Which enrolled workload a process or socket belongs to.
 *
 * A workload is enrolled by the id of its cgroup. Its processes may sit in
 * that cgroup or below it: a Kubernetes pod's containers are cgroups of their
 * own under the pod's (kubepods.slice/.../kubepods-...-pod<uid>.slice/
 * cri-containerd-<id>.scope), and a container that starts later must be
 * captured from its first connect(), not once user space has seen it. So the
 * lookup takes the cgroup itself, then its nearest enrolled ancestor, and
 * returns the workload's own cgroup id: what the capture record, the flow
 * record and the tunnel know the workload by.
 *
 * bcc rewrites map calls (dabba_wl.lookup) only in a program's own file, not
 * in headers (here one stays a call through a pointer, which the verifier
 * refuses as an unknown opcode): each program that includes this header
 * defines dabba_wl_get() in its own file (one line: dabba_wl.lookup(id)).
 */
#ifndef DABBA_WORKLOAD_H
#define DABBA_WORKLOAD_H

#include "maps.h"

static __always_inline struct dabba_workload *dabba_wl_get(u64 *id);

/* Deeper than any kubelet, systemd or lab layout (the lab's pods are at 3). */
#define DABBA_CGROUP_DEPTH 12

/* The workload of the current task's cgroup or of its nearest enrolled ancestor. */
static __always_inline struct dabba_workload *dabba_current_workload(u64 *id)
{
	u64 cg = bpf_get_current_cgroup_id();
	struct dabba_workload *wl = dabba_wl_get(&cg);
	if (wl) {
		*id = cg;
		return wl;
	}
#pragma unroll
	for (int level = DABBA_CGROUP_DEPTH; level > 0; level--) {
		u64 a = bpf_get_current_ancestor_cgroup_id(level);
		if (!a || a == cg) /* 0: the cgroup is not that deep */
			continue;
		wl = dabba_wl_get(&a);
		if (wl) {
			*id = a;
			return wl;
		}
	}
	return 0;
}

/* The same for a socket's cgroup (the cgroup of the task that created it). */
static __always_inline struct dabba_workload *dabba_sk_workload(struct bpf_sock *sk, u64 *id)
{
	u64 cg = bpf_sk_cgroup_id(sk);
	struct dabba_workload *wl = dabba_wl_get(&cg);
	if (wl) {
		*id = cg;
		return wl;
	}
#pragma unroll
	for (int level = DABBA_CGROUP_DEPTH; level > 0; level--) {
		u64 a = bpf_sk_ancestor_cgroup_id(sk, level);
		if (!a || a == cg)
			continue;
		wl = dabba_wl_get(&a);
		if (wl) {
			*id = a;
			return wl;
		}
	}
	return 0;
}

#endif
