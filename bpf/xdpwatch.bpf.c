// SPDX-License-Identifier: GPL-2.0
/* xdpwatch: count every packet by class and track SSH flows, at the XDP hook.
 *
 * Monitor only by default (ENFORCE_MODE 0): every path returns XDP_PASS. With enforcement
 * compiled in (produce --dry-run / --enforce), packets from a blocklisted source, and SSH
 * SYNs over their source's rate limit, are counted and, in enforce mode, dropped; an
 * allowlisted source is never dropped. Headers are bounds-checked before every read; a
 * truncated or invalid header is counted as `malformed` and the packet is passed.
 *
 * Maps (read by producer/loader.py and producer/enforcement.py):
 *   counters   per-CPU array of one struct counters: {packets, bytes} per enum counter_id
 *              (and this CPU's cache of the coarse clock)
 *   flows      LRU hash flow_key -> flow_value; user space ends flows (FIN linger, idle,
 *              shutdown) and deletes them; the kernel only creates and updates entries
 *   events     ring buffer of struct flow_event (flow start, handshake completed, flow end
 *              on RST) and struct banner_event
 *   block_v4/6 LPM tries of blocked source prefixes -> what matched them (user space
 *              adds and removes entries, enforcing their TTL)
 *   allow_v4/6 LPM tries of sources never dropped (loopback, management networks)
 *   syn_rate   LRU hash source -> its SYN budget (GCRA), when SYN_RATE > 0
 *
 * Two programs share these maps: `xdpwatch` at XDP (ingress: counts, flows, enforcement)
 * and `xdpwatch_egress` at TCX egress (the other direction of the SSH flows only).
 */
#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>
#include <linux/pkt_cls.h>

#include "config.h"
#include "xdpwatch.h"

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

#define ETH_P_8021Q_ 0x8100
#define ETH_P_8021AD_ 0x88A8

struct vlan_tag {
	__be16 tci;
	__be16 encap_proto;
};

/* IPv6 extension header prefix shared by hop-by-hop, routing, destination options, AH. */
struct ipv6_ext {
	__u8 nexthdr;
	__u8 hdrlen;
};

struct ipv6_frag {
	__u8 nexthdr;
	__u8 reserved;
	__be16 frag_off;
	__be32 identification;
};

BPF_PERCPU_ARRAY(counters, struct counters, 1);
BPF_TABLE("lru_hash", struct flow_key, struct flow_value, flows, FLOW_TABLE_SIZE);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_LPM_TRIE(block_v4, struct lpm_v4, struct block_value, BLOCKLIST_SIZE);
BPF_LPM_TRIE(block_v6, struct lpm_v6, struct block_value, BLOCKLIST_SIZE);
BPF_LPM_TRIE(allow_v4, struct lpm_v4, __u8, BLOCKLIST_SIZE);
BPF_LPM_TRIE(allow_v6, struct lpm_v6, __u8, BLOCKLIST_SIZE);
#if SYN_RATE
BPF_TABLE("lru_hash", struct src_key, __u64, syn_rate, SYN_RATE_TABLE_SIZE);
#endif

/* What the stages learn about one packet and hand on. The entry point fills the first
 * block, then each stage the fields under its name. Always passed by pointer: every function
 * is inlined, so the compiler keeps the fields in registers (or its own stack slots), as if
 * they were locals. */
struct pkt {
	void *ctx;            /* struct xdp_md (ingress) or struct __sk_buff (egress) */
	void *data;
	void *data_end;
	struct counters *cs;  /* this CPU's element of `counters`: per-CPU, so plain increments are exact */
	__u64 len;            /* the whole frame, Ethernet header included */
	int egress;           /* leaving through the interface (TC hook): see count_class() */
	/* parse_eth(), then parse_ipv4() or parse_ipv6(): the IP header */
	void *l3;             /* the IP header */
	int family;           /* 4 or 6 */
	__u32 *saddr;         /* the packet's addresses, 4 or 16 bytes (family), in the packet */
	__u32 *daddr;
	void *l4;             /* after the IP headers (IPv6: parse_l4() walks the extension headers) */
	__s32 l4_len;         /* bytes from l4 by the IP header's length: short frames carry padding */
	int first_frag;       /* 0 for a non-first fragment: it has no L4 header */
	__u8 proto;           /* the L4 protocol */
	/* check_source() */
	int allowed;          /* an allowlisted source: exempt from the SYN limit */
	/* parse_l4(): a TCP segment to or from an SSH port */
	__u16 sport;          /* host byte order */
	__u16 dport;
	__u32 dir;            /* DIR_TO_SERVER or DIR_TO_CLIENT: the side on an SSH port is the server */
	__u32 payload_off;    /* the payload: `payload_off` bytes from the start of the frame, */
	__s32 payload_len;    /* `payload_len` bytes long */
	__u32 seq;            /* sequence and acknowledgement numbers, host byte order */
	__u32 ack;
	__u8 flags;           /* the TCP flags byte */
};

static __always_inline void count(struct counters *cs, __u32 idx, __u64 len)
{
	cs->c[idx].packets++;
	cs->c[idx].bytes += len;
}

/* Packet classes count ingress only: the packet-counts records are about what arrives. */
static __always_inline void count_class(struct pkt *p, __u32 idx)
{
	if (!p->egress)
		count(p->cs, idx, p->len);
}

/* ------------------------------------------------------------------------ parsing */

/* Ethernet and VLAN tags, counting the packet's L3 class. Returns the IP version, 4 or 6,
 * with p->l3 set, or 0 when there is no more to do: not IP, or malformed (counted; the
 * packet passes). */
static __always_inline int parse_eth(struct pkt *p)
{
	struct ethhdr *eth = p->data;
	if ((void *)(eth + 1) > p->data_end) {
		count_class(p, C_MALFORMED);
		return 0;
	}
	__u16 proto = bpf_ntohs(eth->h_proto);
	void *cur = eth + 1;
	int tagged = 0;

#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		if (proto != ETH_P_8021Q_ && proto != ETH_P_8021AD_)
			break;
		struct vlan_tag *tag = cur;
		if ((void *)(tag + 1) > p->data_end) {
			count_class(p, C_MALFORMED);
			return 0;
		}
		proto = bpf_ntohs(tag->encap_proto);
		cur = tag + 1;
		tagged = 1;
	}
	if (tagged)
		count_class(p, C_VLAN);

	p->l3 = cur;
	if (proto == ETH_P_IP) {
		count_class(p, C_IPV4);
		return 4;
	} else if (proto == ETH_P_IPV6) {
		count_class(p, C_IPV6);
		return 6;
	} else if (proto == ETH_P_ARP) {
		count_class(p, C_ARP);
	} else {
		/* Includes VLAN stacks deeper than MAX_VLAN_TAGS. */
		count_class(p, C_L3_OTHER);
	}
	return 0;
}

/* The IPv4 header, options included. Returns 1 if it is valid, 0 if not (counted). */
static __always_inline int parse_ipv4(struct pkt *p)
{
	void *cur = p->l3;
	struct iphdr *ip = cur;
	if ((void *)(ip + 1) > p->data_end) {
		count_class(p, C_MALFORMED);
		return 0;
	}
	__u32 hlen = ip->ihl * 4;
	if (hlen < sizeof(*ip) || cur + hlen > p->data_end) {
		count_class(p, C_MALFORMED);
		return 0;
	}
	p->family = 4;
	p->saddr = &ip->saddr;
	p->daddr = &ip->daddr;
	p->l4 = cur + hlen;
	p->l4_len = (__s32)bpf_ntohs(ip->tot_len) - (__s32)hlen;
	p->first_frag = (ip->frag_off & bpf_htons(0x1FFF)) == 0;
	p->proto = ip->protocol;
	return 1;
}

/* The fixed IPv6 header only: the extension headers wait until enforcement has looked at the
 * source (parse_l4()). Returns 1 if it is there, 0 if it is truncated (counted). */
static __always_inline int parse_ipv6(struct pkt *p)
{
	struct ipv6hdr *ip6 = p->l3;
	if ((void *)(ip6 + 1) > p->data_end) {
		count_class(p, C_MALFORMED);
		return 0;
	}
	p->family = 6;
	p->saddr = (__u32 *)&ip6->saddr;
	p->daddr = (__u32 *)&ip6->daddr;
	p->l4 = ip6 + 1;
	p->l4_len = bpf_ntohs(ip6->payload_len); /* skip_ipv6_ext() takes its headers off */
	p->first_frag = 1;
	p->proto = ip6->nexthdr;
	return 1;
}

/* IPv6 extension headers, up to L4 or to a non-first fragment (which carries payload, not
 * headers). Returns 0 when one is truncated (counted as malformed). */
static __always_inline int skip_ipv6_ext(struct pkt *p)
{
	void *l4 = p->l4;
	__u8 nexthdr = p->proto;

#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT_HDRS; i++) {
		if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
		    nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_AH) {
			struct ipv6_ext *ext = l4;
			if ((void *)(ext + 1) > p->data_end) {
				count_class(p, C_MALFORMED);
				return 0;
			}
			/* AH counts its length in 4-byte units minus 2 (RFC 4302), the others in
			 * 8-byte units minus 1 (RFC 8200): decided by this header's own type. */
			__u32 hlen = nexthdr == IPPROTO_AH ? (ext->hdrlen + 2) * 4
							   : (ext->hdrlen + 1) * 8;
			nexthdr = ext->nexthdr;
			if (l4 + hlen > p->data_end) { /* body truncated */
				count_class(p, C_MALFORMED);
				return 0;
			}
			l4 += hlen;
		} else if (nexthdr == IPPROTO_FRAGMENT) {
			struct ipv6_frag *fh = l4;
			if ((void *)(fh + 1) > p->data_end) {
				count_class(p, C_MALFORMED);
				return 0;
			}
			nexthdr = fh->nexthdr;
			l4 = fh + 1;
			/* A non-first fragment carries payload, not headers: stop here. */
			if (fh->frag_off & bpf_htons(0xFFF8)) {
				p->first_frag = 0;
				break;
			}
		} else {
			break;
		}
	}
	p->l4_len -= (__s32)(l4 - p->l4);
	p->l4 = l4;
	p->proto = nexthdr;
	return 1;
}

/* The TCP header. Returns 1 for a segment to or from an SSH port (counted as ssh): its
 * ports, direction, sequence numbers, flags and payload are filled in. */
static __always_inline int parse_tcp(struct pkt *p)
{
	struct tcphdr *tcp = p->l4;
	if ((void *)(tcp + 1) > p->data_end || tcp->doff < 5) {
		count_class(p, C_MALFORMED);
		return 0;
	}
	__u16 sport = bpf_ntohs(tcp->source);
	__u16 dport = bpf_ntohs(tcp->dest);
	/* SSH ports are compiled in (config.h, set from --ssh-port): no map lookup. */
	int ssh_src = IS_SSH_PORT(sport), ssh_dst = IS_SSH_PORT(dport);
	if (!ssh_src && !ssh_dst)
		return 0;
	count_class(p, C_SSH);
	p->sport = sport;
	p->dport = dport;
	/* Both ports SSH ports (e.g. 2222 <-> 22): the lower port is the server, so both
	 * directions of the connection land on one key. */
	p->dir = ssh_src && (!ssh_dst || sport < dport) ? DIR_TO_CLIENT : DIR_TO_SERVER;
	/* The payload from the IP length, not the frame's: short frames carry padding. */
	p->payload_off = (__u32)((void *)tcp - p->data) + tcp->doff * 4;
	p->payload_len = p->l4_len - tcp->doff * 4;
	p->seq = bpf_ntohl(tcp->seq);
	p->ack = bpf_ntohl(tcp->ack_seq);
	p->flags = ((__u8 *)tcp)[13];
	return 1;
}

/* L4 of an IP packet that enforcement let through, counting its class. Returns 1 for a TCP
 * segment to or from an SSH port (see parse_tcp()), 0 for anything else. */
static __always_inline int parse_l4(struct pkt *p)
{
	if (p->family == 6 && !skip_ipv6_ext(p))
		return 0;
	if (p->proto == IPPROTO_TCP) {
		count_class(p, C_TCP);
		if (!p->first_frag)
			return 0;
		return parse_tcp(p);
	} else if (p->proto == IPPROTO_UDP) {
		count_class(p, C_UDP);
		if (p->first_frag && p->l4 + sizeof(struct udphdr) > p->data_end)
			count_class(p, C_MALFORMED);
	} else if (p->proto == IPPROTO_ICMP || p->proto == IPPROTO_ICMPV6) {
		count_class(p, C_ICMP);
	} else {
		count_class(p, C_L4_OTHER);
	}
	return 0;
}

/* ------------------------------------------------------------------------ enforcement */

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

/* ------------------------------------------------------------------------ flows */

/* Reserve, fill, submit; a full ring buffer is counted, never silent. */
static __always_inline void emit(struct pkt *p, struct flow_key *key, struct flow_value *val, __u32 type)
{
	struct flow_event *e = events.ringbuf_reserve(sizeof(struct flow_event));
	if (!e) {
		count(p->cs, C_RINGBUF_DROPS, 0);
		return;
	}
	__builtin_memcpy(&e->val, val, sizeof(struct flow_value));
	__builtin_memcpy(&e->key, key, sizeof(struct flow_key));
	e->type = type;
	e->_pad = 0;
	events.ringbuf_submit(e, 0);
	count(p->cs, C_EVENTS_SUBMITTED, 0);
}

/* The first payload packet of each direction: if it starts with "SSH-", its first
 * BANNER_MAX bytes go to user space as a banner_event (the software versions). */
static __always_inline void capture_banner(struct pkt *p, struct flow_key *key, __u64 first_ns)
{
	if (p->payload_len < 4)
		return;
	struct banner_event *e = events.ringbuf_reserve(sizeof(struct banner_event));
	if (!e) {
		count(p->cs, C_RINGBUF_DROPS, 0);
		return;
	}
	__u32 n = p->payload_len > BANNER_MAX ? BANNER_MAX : p->payload_len;
	n &= 0x7f; /* for the verifier: 4..BANNER_MAX (< 128) */
	if (n < 4 || n > BANNER_MAX) {
		events.ringbuf_discard(e, 0);
		return;
	}
	long err = p->egress ? bpf_skb_load_bytes(p->ctx, p->payload_off, e->data, n)
			     : bpf_xdp_load_bytes(p->ctx, p->payload_off, e->data, n);
	if (err || e->data[0] != 'S' || e->data[1] != 'S' || e->data[2] != 'H' || e->data[3] != '-') {
		events.ringbuf_discard(e, 0);
		return;
	}
	__builtin_memcpy(&e->key, key, sizeof(struct flow_key));
	e->first_ns = first_ns;
	__builtin_memset(e->_pad0, 0, sizeof(e->_pad0));
	e->type = EV_BANNER;
	e->len = n;
	e->dir = p->dir;
	e->_pad = 0;
	events.ringbuf_submit(e, 0);
	count(p->cs, C_EVENTS_SUBMITTED, 0);
}

#define HS_FLAGS (TH_SYN | TH_ACK | TH_RST)

/* The client's SYN arriving: the only first packet that starts a handshake (xdpwatch.h,
 * enum handshake). A flow first seen any other way (from the SSH-port side, mid-connection,
 * or leaving this host) stays HS_NONE: its other end is never taken for a client. */
static __always_inline int client_syn(struct pkt *p)
{
	return !p->egress && p->dir == DIR_TO_SERVER && (p->flags & HS_FLAGS) == TH_SYN;
}

/* One step of the three-way handshake of a flow that began with the client's SYN: the
 * server's SYN-ACK must leave (egress) acknowledging the client's ISN, then the client's
 * ACK arrive acknowledging the server's. A SYN-ACK arriving is forged or mirrored: never
 * evidence. A new SYN before completion starts over from its ISN. */
static __always_inline void handshake(struct pkt *p, struct flow_key *key, struct flow_value *v)
{
	__u8 hs = v->handshake;
	if (hs == HS_NONE || hs == HS_COMPLETE)
		return;
	__u8 f = p->flags & HS_FLAGS;
	if (client_syn(p)) {
		v->client_isn = p->seq;
		v->handshake = HS_SYN;
	} else if (p->egress && p->dir == DIR_TO_CLIENT && f == (TH_SYN | TH_ACK) && p->ack == v->client_isn + 1) {
		v->server_isn = p->seq;
		v->handshake = HS_SYN_ACK;
	} else if (hs == HS_SYN_ACK && !p->egress && p->dir == DIR_TO_SERVER && f == TH_ACK &&
		   p->ack == v->server_isn + 1) {
		v->handshake = HS_COMPLETE;
		emit(p, key, v, EV_FLOW_ESTABLISHED);
	}
}

/* Whether a payload may stand for the server's (banner, login sizes): once the server's
 * SYN-ACK was seen leaving, its packets leave; one claiming to come from it that arrives is
 * forged (or mirrored) and is ignored. */
static __always_inline int server_payload_trusted(struct pkt *p, struct flow_value *v)
{
	return p->dir != DIR_TO_CLIENT || p->egress || v->handshake < HS_SYN_ACK;
}

/* CLOCK_MONOTONIC as of the last tick, for the ordinary packets of known flows (see
 * update_flow). bpf_ktime_get_coarse_ns() is a helper call (about 3 ns here); jiffies is a
 * load the verifier inlines, and the coarse clock moves only with it: read the clock once per
 * tick on each CPU, kept in this CPU's counters element. It is behind the precise clock by
 * up to a tick (4 ms at HZ=250; at most 6.1 ms measured on this VM, where ticks can come
 * late). The tick moves jiffies just before the clock: a read between the two keeps the
 * previous tick's time one tick longer. */
static __always_inline __u64 coarse_ns(struct counters *cs)
{
	__u64 j = bpf_jiffies64();
	if (j != cs->clock_jiffies) {
		cs->clock_ns = bpf_ktime_get_coarse_ns();
		cs->clock_jiffies = j;
	}
	return cs->clock_ns;
}

/* A packet of a known flow. On egress (the packet leaves through the interface) it counts in
 * the flow, in its direction, but not in `directions`, which tells what the ingress saw. */
static __always_inline void update_flow(struct pkt *p, struct flow_key *key, struct flow_value *v)
{
	__u32 dir = p->dir, flags = p->flags;
	__u64 len = p->len;
	/* Atomic: the XDP and the egress program (or XDP on two RX queues) can update one flow
	 * on two CPUs at once. */
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, len);
	if (dir == DIR_TO_CLIENT) {
		__sync_fetch_and_add(&v->to_client_packets, 1);
		__sync_fetch_and_add(&v->to_client_bytes, len);
	}
	/* The clock. bpf_ktime_get_ns() costs about 25 ns on this VM, four bare XDP_PASS
	 * programs, and this is the path of every packet of a known flow. A packet that ends
	 * the connection (FIN, RST) is timed with it, as a new flow is: fin_ns and rst_ns are
	 * precise. Every other packet only moves last_ns, with coarse_ns() (the same clock, a
	 * few ms behind: a flow's reported end, and its idle timeout, can be that much early).
	 * That can be older than a precise time already stored (first_ns, a FIN's), so it only
	 * ever moves last_ns forward: last_ns >= first_ns always. */
	__u64 now;
	if (flags & (TH_FIN | TH_RST)) {
		now = bpf_ktime_get_ns();
		v->last_ns = now;
	} else {
		now = coarse_ns(p->cs);
		if (now > v->last_ns)
			v->last_ns = now;
	}
	if (flags & ~v->tcp_flags)
		v->tcp_flags |= flags;
	if (!p->egress && !(v->directions & dir))
		v->directions |= dir;
	if (v->handshake != HS_COMPLETE)
		handshake(p, key, v);
	if (p->payload_len > 0 && server_payload_trusted(p, v)) {
		if (!(v->banners & dir)) {
			v->banners |= dir;
			capture_banner(p, key, v->first_ns);
		}
		if (dir == DIR_TO_CLIENT) {
			__u8 i = v->nsizes;
			if (i < SERVER_SIZES) {
				v->server_sizes[i] = p->payload_len > 0xffff ? 0xffff : p->payload_len;
				v->nsizes = i + 1;
			}
		}
	}
	if ((flags & TH_RST) && !v->rst_ns) {
		v->rst_ns = now;
		emit(p, key, v, EV_FLOW_END_RST);
	} else if ((flags & TH_FIN) && !v->fin_ns) {
		v->fin_ns = now;
	}
}

/* The flow's key, normalised (xdpwatch.h): the client is the side that is not on the SSH
 * port. IPv4 uses the first 4 bytes of each address, the rest stays zero. (__u32 pointers:
 * IP header addresses are 4-byte fields, copied in words, not bytes.) */
static __always_inline void flow_key_of(struct pkt *p, struct flow_key *key)
{
	int to_client = p->dir == DIR_TO_CLIENT;
	__u32 *client = to_client ? p->daddr : p->saddr;
	__u32 *server = to_client ? p->saddr : p->daddr;
	if (p->family == 4) {
		__builtin_memcpy(key->client_addr, client, 4);
		__builtin_memcpy(key->server_addr, server, 4);
	} else {
		__builtin_memcpy(key->client_addr, client, 16);
		__builtin_memcpy(key->server_addr, server, 16);
	}
	key->client_port = to_client ? p->dport : p->sport;
	key->server_port = to_client ? p->sport : p->dport;
	key->family = p->family;
	key->proto = IPPROTO_TCP;
}

/* One SSH segment in direction p->dir: update its flow, or start one. */
static __always_inline void flow_packet(struct pkt *p)
{
	/* The key only now, for SSH packets: every other packet is spared building it. */
	struct flow_key key = {};
	flow_key_of(p, &key);
	__u32 dir = p->dir, flags = p->flags;
	__u64 len = p->len;
	int syn = flags & TH_SYN;
	struct flow_value *v = flows.lookup(&key);

	/* A SYN on a flow already ended by RST is a new connection reusing the 5-tuple. */
	if (v && !(v->rst_ns && syn)) {
		update_flow(p, &key, v);
		return;
	}

	__u64 now = bpf_ktime_get_ns(); /* a new flow: the precise clock for first_ns */
	struct flow_value nv = {};
	nv.first_ns = now;
	nv.last_ns = now;
	nv.packets = 1;
	nv.bytes = len;
	if (dir == DIR_TO_CLIENT) {
		nv.to_client_packets = 1;
		nv.to_client_bytes = len;
	}
	nv.tcp_flags = flags;
	nv.directions = p->egress ? 0 : dir;
	if (client_syn(p)) {
		nv.handshake = HS_SYN;
		nv.client_isn = p->seq;
	}
	if (p->payload_len > 0) {
		nv.banners = dir;
		if (dir == DIR_TO_CLIENT) {
			nv.server_sizes[0] = p->payload_len > 0xffff ? 0xffff : p->payload_len;
			nv.nsizes = 1;
		}
	}
	nv.midstream = !syn; /* SYN or SYN-ACK opens; anything else joins mid-connection */
	if (flags & TH_RST)
		nv.rst_ns = now;
	else if (flags & TH_FIN)
		nv.fin_ns = now;

	if (v) {
		flows.update(&key, &nv);
	} else if (flows.insert(&key, &nv) != 0) {
		/* Another CPU created it first: count this packet there. */
		v = flows.lookup(&key);
		if (v)
			update_flow(p, &key, v);
		return;
	}
	count(p->cs, C_FLOWS_STARTED, 0);
	emit(p, &key, &nv, EV_FLOW_START);
	if (nv.banners)
		capture_banner(p, &key, nv.first_ns);
	if (nv.rst_ns)
		emit(p, &key, &nv, EV_FLOW_END_RST);
}

/* An SSH segment (parse_l4() returned 1): update its flow, or start one. The two calls are
 * the same code, written out twice so that in each the compiler knows p->dir: the direction
 * tests inside fold away (38 fewer instructions run per packet of a known flow than with
 * one copy for both directions). */
static __always_inline void track_flow(struct pkt *p)
{
	if (p->dir == DIR_TO_CLIENT)
		flow_packet(p);
	else
		flow_packet(p);
}

/* ------------------------------------------------------------------------ entry points */

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
	__u32 zero = 0;
	p->cs = counters.lookup(&zero);
	if (!p->cs) /* never: the array's one element always exists */
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
	struct pkt p = {.ctx = ctx, .data = (void *)(long)ctx->data, .data_end = (void *)(long)ctx->data_end};
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
			.len = skb->len, .egress = 1};
	handle(&p);
	return TC_ACT_UNSPEC;
}
