// SPDX-License-Identifier: GPL-2.0
/* xdpwatch: count every packet by class and track SSH flows, at the XDP hook.
 *
 * Monitor only by default (ENFORCE_MODE 0): every path returns XDP_PASS. With enforcement
 * compiled in (produce --dry-run / --enforce), packets from a blocklisted source, and SSH
 * SYNs over their source's rate limit, are counted and, in enforce mode, dropped; an
 * allowlisted source is never dropped. Headers are bounds-checked before every read; a
 * truncated or invalid header is counted as `malformed` and the packet is passed.
 *
 * Two programs share the maps (maps.h): `xdpwatch` at XDP (ingress: counts, flows,
 * enforcement) and `xdpwatch_egress` at TCX egress (the other direction of the SSH flows
 * only). This file holds them; the stages they run, in the order handle() runs them, are in
 * parse.h, enforce.h and flows.h, and pass one struct pkt (pkt.h) between them.
 */
#include <uapi/linux/bpf.h>
#include <linux/pkt_cls.h>

#include "config.h"
#include "xdpwatch.h"
#include "maps.h"     /* every map */
#include "pkt.h"      /* struct pkt: what the stages learn about a packet and pass on */
#include "parse.h"    /* parse_eth(), parse_ipv4(), parse_ipv6(), parse_l4() */
#include "enforce.h"  /* check_source(), check_syn_rate() */
#include "flows.h"    /* track_flow() */

/* The stages after a valid IP header: enforcement by source, L4, the SYN limit, the flow. */
static __always_inline int ip_stages(struct pkt *p)
{
	int verdict = check_source(p);
	if (verdict != XDP_PASS)
		return verdict;
	if (!parse_l4(p))
		return XDP_PASS;
	verdict = check_syn_rate(p);
	if (verdict != XDP_PASS)
		return verdict;
	track_flow(p);
	return XDP_PASS;
}

/* Every stage in order, for both hooks. ip_stages() is written out once per IP version: in
 * each copy the compiler knows the family, so the addresses and the L4 position stay in
 * registers and are computed only where used (22 fewer instructions run per UDP packet, 24
 * per SSH packet of a known flow, than with one copy for both). */
static __always_inline int handle(struct pkt *p)
{
	/* The interface's counters: its slot from the direct-mapped table (an array lookup the
	 * verifier inlines: a few instructions), else from the hash (a collision there), else
	 * the spare last slot (an interface between attach and registration: never reported). */
	__u32 ifindex = p->ifindex; /* a copy: taking p's address would keep p out of registers */
	__u32 idx = ifindex & (IFSLOT_CACHE - 1);
	__u32 slot = MAX_IFACES;
	struct ifslot *is = ifslots.lookup(&idx);
	if (is && is->ifindex == ifindex) {
		slot = is->slot;
	} else {
		__u32 *s = ifslots_more.lookup(&ifindex);
		if (s)
			slot = *s;
	}
	p->cs = counters.lookup(&slot);
	if (!p->cs) /* never: user space gives slots below MAX_IFACES */
		return XDP_PASS;
	count_class(p, C_TOTAL);
	int family = parse_eth(p);
	if (family == 4)
		return parse_ipv4(p) ? ip_stages(p) : XDP_PASS;
	if (family == 6)
		return parse_ipv6(p) ? ip_stages(p) : XDP_PASS;
	return XDP_PASS;
}

int xdpwatch(struct xdp_md *ctx)
{
	struct pkt p = {.ctx = ctx, .data = (void *)(long)ctx->data, .data_end = (void *)(long)ctx->data_end,
			.ifindex = ctx->ingress_ifindex};
	p.len = p.data_end - p.data;
	return handle(&p);
}

/* The other direction: packets leaving through the interface (TCX egress), for the SSH
 * flows only. Never changes anything: the verdict is always "next program / pass". */
int xdpwatch_egress(struct __sk_buff *skb)
{
	/* skb->len: the whole packet (headers are in the linear part we parse; a GSO packet
	 * counts once with its full length, as the interface's own counters do). */
	struct pkt p = {.ctx = skb, .data = (void *)(long)skb->data, .data_end = (void *)(long)skb->data_end,
			.len = skb->len, .egress = 1, .ifindex = skb->ifindex};
	handle(&p);
	return TC_ACT_UNSPEC;
}
