/* Enforcement (produce --dry-run / --enforce; compiled out when ENFORCE_MODE is 0): block
 * and allow lists by source prefix, and the per-source SSH SYN rate limit. */
#ifndef XDPWATCH_ENFORCE_H
#define XDPWATCH_ENFORCE_H

#include "config.h"
#include "maps.h"
#include "pkt.h"

/* The verdict for a packet enforcement catches: dropped only in enforce mode. */
#define CAUGHT (ENFORCE_MODE == 2 ? XDP_DROP : XDP_PASS)

/* Enforcement by source address, before anything past the IP header is parsed: an
 * allowlisted source passes (and p->allowed is set, exempting it from the SYN limit); a
 * blocklisted one is counted on its entry and CAUGHT. Returns the verdict. */
static __always_inline int check_source(struct pkt *p)
{
#if ENFORCE_MODE
	if (p->egress) /* enforcement is about what arrives */
		return XDP_PASS;
	struct block_value *b;
	if (p->family == 4) {
		struct lpm_v4 k = {.prefixlen = 32};
		__builtin_memcpy(k.addr, p->saddr, 4);
		if (allow_v4.lookup(&k)) {
			p->allowed = 1;
			return XDP_PASS;
		}
		b = block_v4.lookup(&k);
	} else {
		struct lpm_v6 k = {.prefixlen = 128};
		__builtin_memcpy(k.addr, p->saddr, 16);
		if (allow_v6.lookup(&k)) {
			p->allowed = 1;
			return XDP_PASS;
		}
		b = block_v6.lookup(&k);
	}
	if (b) {
		__sync_fetch_and_add(&b->packets, 1);
		__sync_fetch_and_add(&b->bytes, p->len);
		count(p->cs, C_BLOCKED, p->len);
		return CAUGHT;
	}
#endif
	return XDP_PASS;
}

/* GCRA: a source may open SYN_BURST connections at once, then SYN_RATE per second.
 * `tat` is the theoretical arrival time of its next SYN. Races between CPUs can let a
 * SYN or two more through; never fewer. */
static __always_inline int syn_over_limit(struct pkt *p)
{
#if ENFORCE_MODE && SYN_RATE
	const __u64 interval = 1000000000ULL / SYN_RATE;
	const __u64 tolerance = interval * (SYN_BURST - 1);
	__u64 now = bpf_ktime_get_ns();
	struct src_key sk = {};
	if (p->family == 4)
		__builtin_memcpy(sk.addr, p->saddr, 4);
	else
		__builtin_memcpy(sk.addr, p->saddr, 16);
	sk.family = p->family;
	__u64 *tat = syn_rate.lookup(&sk);
	if (!tat) {
		__u64 next = now + interval;
		syn_rate.update(&sk, &next);
		return 0;
	}
	__u64 t = *tat > now ? *tat : now;
	if (t - now > tolerance)
		return 1;
	*tat = t + interval;
#endif
	return 0;
}

/* A new connection (a SYN without ACK, to the server) over its source's limit: counted,
 * and in enforce mode dropped before it becomes a flow. Returns the verdict. */
static __always_inline int check_syn_rate(struct pkt *p)
{
	if (SYN_RATE && !p->egress && p->dir == DIR_TO_SERVER && (p->flags & (TH_SYN | TH_ACK)) == TH_SYN &&
	    !p->allowed && syn_over_limit(p)) {
		count_class(p, C_SYN_LIMITED);
		return CAUGHT;
	}
	return XDP_PASS;
}

#endif
