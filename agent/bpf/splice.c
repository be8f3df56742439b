// SPDX-License-Identifier: GPL-2.0
/*
 * Splice: sk_skb stream verdict on the dabba_splice SOCKHASH.
 *
 * User space (the tunnel) pairs two sockets by putting both in dabba_splice,
 * keyed by socket cookie, and each one's peer in dabba_pairs. From then on
 * every segment received on one is sent out of the other by the kernel; the
 * tunnel reads no payload. The per-direction byte count lets user space
 * propagate a half-close only after every redirected byte reached the peer.
 *
 * Known limit (kernel, not ours to fix here): a redirected skb waits in the
 * peer's psock queue (ingress_skb), which has no size limit, while the
 * source socket's receive window stays open. A sender faster than the
 * receiver therefore grows kernel memory for as long as it sends (measured:
 * about 250 MB/s with same-node iperf3 on 2 cores; freed when the flow ends).
 * Upstream rejected dropping there, as it breaks TCP. The bounded way is
 * sender-side sk_msg redirection; see the tunnel issue's closing note.
 */
#include <uapi/linux/bpf.h>

#include "maps.h"

/* Count n events of kind stat in dabba_stats (see include/maps.h). */
static __always_inline void count(u32 stat, u64 n)
{
	u64 *v = dabba_stats.lookup(&stat);
	if (v)
		*v += n;
}

int dabba_verdict(struct __sk_buff *skb)
{
	/*
	 * A segment without payload (the FIN) has nothing to move; redirected,
	 * the peer's send of 0 bytes would count as a broken pipe. The FIN
	 * itself is propagated by user space (shutdown) once all bytes are out.
	 */
	if (skb->len == 0)
		return SK_DROP;

	u64 me = bpf_get_socket_cookie(skb);
	struct dabba_pair *p = dabba_pairs.lookup(&me);
	if (!p) {
		count(DABBA_ST_SPLICE_PASS, 1);
		return SK_PASS;
	}
	__sync_fetch_and_add(&p->bytes, skb->len);
	count(DABBA_ST_SPLICE_BYTES, skb->len);
	return dabba_splice.sk_redirect_hash(skb, &p->peer, 0);
}
