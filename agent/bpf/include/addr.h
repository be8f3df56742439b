/* SPDX-License-Identifier: GPL-2.0 */
/*
 * Addresses of both families as struct dabba_ip6 (include/types.h): IPv6 as
 * it is, IPv4 as IPv4-mapped (::ffff:a.b.c.d). No map calls here (bcc
 * rewrites those only in a program's own file).
 */
#ifndef DABBA_ADDR_H
#define DABBA_ADDR_H

#include "types.h"

/*
 * A context's IPv6 address fields one 4-byte load each: the verifier refuses the 8-byte load
 * clang would otherwise merge two neighbouring words into ("invalid bpf_context access").
 */
#define DABBA_CTX32(x) (*(volatile __u32 *)&(x))
#define DABBA_CTX_IP6(a)                                                                           \
	dabba_v6(DABBA_CTX32((a)[0]), DABBA_CTX32((a)[1]), DABBA_CTX32((a)[2]), DABBA_CTX32((a)[3]))

/* An IPv4 address (network order) as IPv4-mapped. */
static __always_inline struct dabba_ip6 dabba_v4(__u32 ip)
{
	struct dabba_ip6 a = {.w = {0, 0, bpf_htonl(0xffff), ip}};
	return a;
}

static __always_inline struct dabba_ip6 dabba_v6(__u32 w0, __u32 w1, __u32 w2, __u32 w3)
{
	struct dabba_ip6 a = {.w = {w0, w1, w2, w3}};
	return a;
}

static __always_inline int dabba_is_v4mapped(const struct dabba_ip6 *a)
{
	return !a->w[0] && !a->w[1] && a->w[2] == bpf_htonl(0xffff);
}

static __always_inline int dabba_ip_eq(const struct dabba_ip6 *a, const struct dabba_ip6 *b)
{
	return a->w[0] == b->w[0] && a->w[1] == b->w[1] && a->w[2] == b->w[2] && a->w[3] == b->w[3];
}

static __always_inline int dabba_ip_zero(const struct dabba_ip6 *a)
{
	return !a->w[0] && !a->w[1] && !a->w[2] && !a->w[3];
}

/* Loopback: 127/8, ::1 (and ::ffff:127/8). */
static __always_inline int dabba_is_loopback(const struct dabba_ip6 *a)
{
	if (dabba_is_v4mapped(a))
		return (bpf_ntohl(a->w[3]) >> 24) == 127;
	return !a->w[0] && !a->w[1] && !a->w[2] && a->w[3] == bpf_htonl(1);
}

#endif /* DABBA_ADDR_H */
