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

/* Packet classes count ingress only (the packet-counts records are about what arrives);
 * the parse functions below take `egress` and this CPU's counters `cs`, and use this. */
#define COUNT(idx, len) do { if (!egress) count(cs, idx, len); } while (0)

/* The verdict for a packet enforcement catches: dropped only in enforce mode. */
#define CAUGHT (ENFORCE_MODE == 2 ? XDP_DROP : XDP_PASS)

/* `cs` is this CPU's element of `counters`, looked up once per packet by parse_frame:
 * per-CPU, so plain increments are exact. */
static __always_inline void count(struct counters *cs, __u32 idx, __u64 len)
{
	cs->c[idx].packets++;
	cs->c[idx].bytes += len;
}

/* Reserve, fill, submit; a full ring buffer is counted, never silent. */
static __always_inline void emit(struct counters *cs, struct flow_key *key, struct flow_value *val,
				 __u32 type)
{
	struct flow_event *e = events.ringbuf_reserve(sizeof(struct flow_event));
	if (!e) {
		count(cs, C_RINGBUF_DROPS, 0);
		return;
	}
	__builtin_memcpy(&e->val, val, sizeof(struct flow_value));
	__builtin_memcpy(&e->key, key, sizeof(struct flow_key));
	e->type = type;
	e->_pad = 0;
	events.ringbuf_submit(e, 0);
	count(cs, C_EVENTS_SUBMITTED, 0);
}

/* One TCP segment of an SSH flow, as the flow functions use it. */
struct seg {
	void *ctx;            /* struct xdp_md (ingress) or struct __sk_buff (egress) */
	__u32 off;            /* the payload: `off` bytes from the start of the frame, */
	__s32 len;            /* `len` bytes long */
	__u32 seq;            /* sequence and acknowledgement numbers, host byte order */
	__u32 ack;
	__u8 flags;           /* the TCP flags byte */
};

/* The first payload packet of each direction: if it starts with "SSH-", its first
 * BANNER_MAX bytes go to user space as a banner_event (the software versions). */
static __always_inline void capture_banner(struct counters *cs, struct flow_key *key, __u64 first_ns,
					   __u32 dir, struct seg *sg, int egress)
{
	if (sg->len < 4)
		return;
	struct banner_event *e = events.ringbuf_reserve(sizeof(struct banner_event));
	if (!e) {
		count(cs, C_RINGBUF_DROPS, 0);
		return;
	}
	__u32 n = sg->len > BANNER_MAX ? BANNER_MAX : sg->len;
	n &= 0x7f; /* for the verifier: 4..BANNER_MAX (< 128) */
	if (n < 4 || n > BANNER_MAX) {
		events.ringbuf_discard(e, 0);
		return;
	}
	long err = egress ? bpf_skb_load_bytes(sg->ctx, sg->off, e->data, n)
			  : bpf_xdp_load_bytes(sg->ctx, sg->off, e->data, n);
	if (err || e->data[0] != 'S' || e->data[1] != 'S' || e->data[2] != 'H' || e->data[3] != '-') {
		events.ringbuf_discard(e, 0);
		return;
	}
	__builtin_memcpy(&e->key, key, sizeof(struct flow_key));
	e->first_ns = first_ns;
	__builtin_memset(e->_pad0, 0, sizeof(e->_pad0));
	e->type = EV_BANNER;
	e->len = n;
	e->dir = dir;
	e->_pad = 0;
	events.ringbuf_submit(e, 0);
	count(cs, C_EVENTS_SUBMITTED, 0);
}

#define HS_FLAGS (TH_SYN | TH_ACK | TH_RST)

/* The client's SYN arriving: the only first packet that starts a handshake (xdpwatch.h,
 * enum handshake). A flow first seen any other way (from the SSH-port side, mid-connection,
 * or leaving this host) stays HS_NONE: its other end is never taken for a client. */
static __always_inline int client_syn(struct seg *sg, __u32 dir, int egress)
{
	return !egress && dir == DIR_TO_SERVER && (sg->flags & HS_FLAGS) == TH_SYN;
}

/* One step of the three-way handshake of a flow that began with the client's SYN: the
 * server's SYN-ACK must leave (egress) acknowledging the client's ISN, then the client's
 * ACK arrive acknowledging the server's. A SYN-ACK arriving is forged or mirrored: never
 * evidence. A new SYN before completion starts over from its ISN. */
static __always_inline void handshake(struct counters *cs, struct flow_key *key, struct flow_value *v,
				      struct seg *sg, __u32 dir, int egress)
{
	__u8 hs = v->handshake;
	if (hs == HS_NONE || hs == HS_COMPLETE)
		return;
	__u8 f = sg->flags & HS_FLAGS;
	if (client_syn(sg, dir, egress)) {
		v->client_isn = sg->seq;
		v->handshake = HS_SYN;
	} else if (egress && dir == DIR_TO_CLIENT && f == (TH_SYN | TH_ACK) && sg->ack == v->client_isn + 1) {
		v->server_isn = sg->seq;
		v->handshake = HS_SYN_ACK;
	} else if (hs == HS_SYN_ACK && !egress && dir == DIR_TO_SERVER && f == TH_ACK &&
		   sg->ack == v->server_isn + 1) {
		v->handshake = HS_COMPLETE;
		emit(cs, key, v, EV_FLOW_ESTABLISHED);
	}
}

/* Whether a payload may stand for the server's (banner, login sizes): once the server's
 * SYN-ACK was seen leaving, its packets leave; one claiming to come from it that arrives is
 * forged (or mirrored) and is ignored. */
static __always_inline int server_payload_trusted(struct flow_value *v, __u32 dir, int egress)
{
	return dir != DIR_TO_CLIENT || egress || v->handshake < HS_SYN_ACK;
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

/* `egress`: the packet leaves through the interface (TC hook); it counts in the flow, in
 * its direction, but not in `directions`, which tells what the ingress saw. */
static __always_inline void update_flow(struct counters *cs, struct flow_key *key, struct flow_value *v,
					__u32 dir, __u64 len, int egress, struct seg *sg)
{
	__u32 flags = sg->flags;
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
		now = coarse_ns(cs);
		if (now > v->last_ns)
			v->last_ns = now;
	}
	if (flags & ~v->tcp_flags)
		v->tcp_flags |= flags;
	if (!egress && !(v->directions & dir))
		v->directions |= dir;
	if (v->handshake != HS_COMPLETE)
		handshake(cs, key, v, sg, dir, egress);
	if (sg->len > 0 && server_payload_trusted(v, dir, egress)) {
		if (!(v->banners & dir)) {
			v->banners |= dir;
			capture_banner(cs, key, v->first_ns, dir, sg, egress);
		}
		if (dir == DIR_TO_CLIENT) {
			__u8 i = v->nsizes;
			if (i < SERVER_SIZES) {
				v->server_sizes[i] = sg->len > 0xffff ? 0xffff : sg->len;
				v->nsizes = i + 1;
			}
		}
	}
	if ((flags & TH_RST) && !v->rst_ns) {
		v->rst_ns = now;
		emit(cs, key, v, EV_FLOW_END_RST);
	} else if ((flags & TH_FIN) && !v->fin_ns) {
		v->fin_ns = now;
	}
}

static __always_inline void track_flow(struct counters *cs, struct flow_key *key, __u32 dir, __u64 len, int egress,
				       struct seg *sg)
{
	__u32 flags = sg->flags;
	int syn = flags & TH_SYN;
	struct flow_value *v = flows.lookup(key);

	/* A SYN on a flow already ended by RST is a new connection reusing the 5-tuple. */
	if (v && !(v->rst_ns && syn)) {
		update_flow(cs, key, v, dir, len, egress, sg);
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
	nv.directions = egress ? 0 : dir;
	if (client_syn(sg, dir, egress)) {
		nv.handshake = HS_SYN;
		nv.client_isn = sg->seq;
	}
	if (sg->len > 0) {
		nv.banners = dir;
		if (dir == DIR_TO_CLIENT) {
			nv.server_sizes[0] = sg->len > 0xffff ? 0xffff : sg->len;
			nv.nsizes = 1;
		}
	}
	nv.midstream = !syn; /* SYN or SYN-ACK opens; anything else joins mid-connection */
	if (flags & TH_RST)
		nv.rst_ns = now;
	else if (flags & TH_FIN)
		nv.fin_ns = now;

	if (v) {
		flows.update(key, &nv);
	} else if (flows.insert(key, &nv) != 0) {
		/* Another CPU created it first: count this packet there. */
		v = flows.lookup(key);
		if (v)
			update_flow(cs, key, v, dir, len, egress, sg);
		return;
	}
	count(cs, C_FLOWS_STARTED, 0);
	emit(cs, key, &nv, EV_FLOW_START);
	if (nv.banners)
		capture_banner(cs, key, nv.first_ns, dir, sg, egress);
	if (nv.rst_ns)
		emit(cs, key, &nv, EV_FLOW_END_RST);
}

/* Enforcement by source address, before anything else is parsed: an allowlisted source
 * passes (and *allowed is set, exempting it from the SYN limit); a blocklisted one is
 * counted on its entry and CAUGHT. */
static __always_inline int check_source(struct counters *cs, void *saddr, int family, __u64 len, int egress,
					int *allowed)
{
#if ENFORCE_MODE
	if (egress) /* enforcement is about what arrives */
		return XDP_PASS;
	struct block_value *b;
	if (family == 4) {
		struct lpm_v4 k = {.prefixlen = 32};
		__builtin_memcpy(k.addr, saddr, 4);
		if (allow_v4.lookup(&k)) {
			*allowed = 1;
			return XDP_PASS;
		}
		b = block_v4.lookup(&k);
	} else {
		struct lpm_v6 k = {.prefixlen = 128};
		__builtin_memcpy(k.addr, saddr, 16);
		if (allow_v6.lookup(&k)) {
			*allowed = 1;
			return XDP_PASS;
		}
		b = block_v6.lookup(&k);
	}
	if (b) {
		__sync_fetch_and_add(&b->packets, 1);
		__sync_fetch_and_add(&b->bytes, len);
		count(cs, C_BLOCKED, len);
		return CAUGHT;
	}
#endif
	return XDP_PASS;
}

/* GCRA: a source may open SYN_BURST connections at once, then SYN_RATE per second.
 * `tat` is the theoretical arrival time of its next SYN. Races between CPUs can let a
 * SYN or two more through; never fewer. */
static __always_inline int syn_over_limit(struct flow_key *key)
{
#if ENFORCE_MODE && SYN_RATE
	const __u64 interval = 1000000000ULL / SYN_RATE;
	const __u64 tolerance = interval * (SYN_BURST - 1);
	__u64 now = bpf_ktime_get_ns();
	struct src_key sk = {};
	__builtin_memcpy(sk.addr, key->client_addr, 16);
	sk.family = key->family;
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

/* The addresses of a flow key; IPv4 uses the first 4 bytes of each, the rest stays zero.
 * (__u32 pointers: IP header addresses are 4-byte fields, copied in words, not bytes.) */
static __always_inline void key_addrs(struct flow_key *key, int family, __u32 *client, __u32 *server)
{
	if (family == 4) {
		__builtin_memcpy(key->client_addr, client, 4);
		__builtin_memcpy(key->server_addr, server, 4);
	} else {
		__builtin_memcpy(key->client_addr, client, 16);
		__builtin_memcpy(key->server_addr, server, 16);
	}
}

/* L4 of an IP packet whose L3 header was valid. `l4` points after the IP headers;
 * `first_frag` is 0 for non-first fragments (no L4 header in them); `saddr` and `daddr`
 * are the packet's addresses (4 or 16 bytes: `family`). Returns the verdict. */
static __always_inline int parse_l4(struct counters *cs, void *ctx, void *data, void *l4, void *data_end,
				    __u8 proto, int first_frag, int family, __u32 *saddr, __u32 *daddr, __u64 len,
				    __s32 l4_len, int allowed, int egress)
{
	if (proto == IPPROTO_TCP) {
		COUNT(C_TCP, len);
		if (!first_frag)
			return XDP_PASS;
		struct tcphdr *tcp = l4;
		if ((void *)(tcp + 1) > data_end || tcp->doff < 5) {
			COUNT(C_MALFORMED, len);
			return XDP_PASS;
		}
		__u16 sport = bpf_ntohs(tcp->source);
		__u16 dport = bpf_ntohs(tcp->dest);
		/* SSH ports are compiled in (config.h, set from --ssh-port): no map lookup. */
		int ssh_src = IS_SSH_PORT(sport), ssh_dst = IS_SSH_PORT(dport);
		if (!ssh_src && !ssh_dst)
			return XDP_PASS;
		COUNT(C_SSH, len);
		/* The key only now, for SSH packets: every other packet is spared building it. */
		struct flow_key key = {};
		key.family = family;
		key.proto = IPPROTO_TCP;
		/* The payload from the IP length, not the frame's: short frames carry padding. */
		struct seg sg = {.ctx = ctx, .off = (__u32)((void *)tcp - data) + tcp->doff * 4,
				 .len = l4_len - tcp->doff * 4, .seq = bpf_ntohl(tcp->seq),
				 .ack = bpf_ntohl(tcp->ack_seq), .flags = ((__u8 *)tcp)[13]};
		/* Both ports SSH ports (e.g. 2222 <-> 22): the lower port is the server, so both
		 * directions of the connection land on one key. */
		int to_client = ssh_src && (!ssh_dst || sport < dport);
		if (to_client) { /* server -> client: the client is the destination */
			key_addrs(&key, family, daddr, saddr);
			key.client_port = dport;
			key.server_port = sport;
			track_flow(cs, &key, DIR_TO_CLIENT, len, egress, &sg);
		} else {
			key_addrs(&key, family, saddr, daddr);
			key.client_port = sport;
			key.server_port = dport;
			/* A new connection (SYN without ACK) over its source's limit: counted, and in
			 * enforce mode dropped before it becomes a flow. */
			if (SYN_RATE && !egress && (sg.flags & (TH_SYN | TH_ACK)) == TH_SYN && !allowed &&
			    syn_over_limit(&key)) {
				COUNT(C_SYN_LIMITED, len);
				if (CAUGHT == XDP_DROP)
					return XDP_DROP;
			}
			track_flow(cs, &key, DIR_TO_SERVER, len, egress, &sg);
		}
	} else if (proto == IPPROTO_UDP) {
		COUNT(C_UDP, len);
		if (first_frag && l4 + sizeof(struct udphdr) > data_end)
			COUNT(C_MALFORMED, len);
	} else if (proto == IPPROTO_ICMP || proto == IPPROTO_ICMPV6) {
		COUNT(C_ICMP, len);
	} else {
		COUNT(C_L4_OTHER, len);
	}
	return XDP_PASS;
}

static __always_inline int parse_ipv4(struct counters *cs, void *ctx, void *data, void *cur, void *data_end,
				      __u64 len, int egress)
{
	struct iphdr *ip = cur;
	if ((void *)(ip + 1) > data_end) {
		COUNT(C_MALFORMED, len);
		return XDP_PASS;
	}
	__u32 hlen = ip->ihl * 4;
	if (hlen < sizeof(*ip) || cur + hlen > data_end) {
		COUNT(C_MALFORMED, len);
		return XDP_PASS;
	}
	int allowed = 0;
	int verdict = check_source(cs, &ip->saddr, 4, len, egress, &allowed);
	if (verdict != XDP_PASS)
		return verdict;
	int first_frag = (ip->frag_off & bpf_htons(0x1FFF)) == 0;
	__s32 l4_len = (__s32)bpf_ntohs(ip->tot_len) - (__s32)hlen;
	return parse_l4(cs, ctx, data, cur + hlen, data_end, ip->protocol, first_frag, 4, &ip->saddr, &ip->daddr,
			len, l4_len, allowed, egress);
}

static __always_inline int parse_ipv6(struct counters *cs, void *ctx, void *data, void *cur, void *data_end,
				      __u64 len, int egress)
{
	struct ipv6hdr *ip6 = cur;
	if ((void *)(ip6 + 1) > data_end) {
		COUNT(C_MALFORMED, len);
		return XDP_PASS;
	}
	int allowed = 0;
	int verdict = check_source(cs, &ip6->saddr, 6, len, egress, &allowed);
	if (verdict != XDP_PASS)
		return verdict;
	__u8 nexthdr = ip6->nexthdr;
	void *l4 = ip6 + 1;
	int first_frag = 1;

#pragma unroll
	for (int i = 0; i < MAX_IPV6_EXT_HDRS; i++) {
		if (nexthdr == IPPROTO_HOPOPTS || nexthdr == IPPROTO_ROUTING ||
		    nexthdr == IPPROTO_DSTOPTS || nexthdr == IPPROTO_AH) {
			struct ipv6_ext *ext = l4;
			if ((void *)(ext + 1) > data_end) {
				COUNT(C_MALFORMED, len);
				return XDP_PASS;
			}
			/* AH counts its length in 4-byte units minus 2 (RFC 4302), the others in
			 * 8-byte units minus 1 (RFC 8200): decided by this header's own type. */
			__u32 hlen = nexthdr == IPPROTO_AH ? (ext->hdrlen + 2) * 4
							   : (ext->hdrlen + 1) * 8;
			nexthdr = ext->nexthdr;
			if (l4 + hlen > data_end) { /* body truncated */
				COUNT(C_MALFORMED, len);
				return XDP_PASS;
			}
			l4 += hlen;
		} else if (nexthdr == IPPROTO_FRAGMENT) {
			struct ipv6_frag *fh = l4;
			if ((void *)(fh + 1) > data_end) {
				COUNT(C_MALFORMED, len);
				return XDP_PASS;
			}
			nexthdr = fh->nexthdr;
			l4 = fh + 1;
			/* A non-first fragment carries payload, not headers: stop here. */
			if (fh->frag_off & bpf_htons(0xFFF8)) {
				first_frag = 0;
				break;
			}
		} else {
			break;
		}
	}

	__s32 l4_len = (__s32)bpf_ntohs(ip6->payload_len) - (__s32)(l4 - (void *)(ip6 + 1));
	return parse_l4(cs, ctx, data, l4, data_end, nexthdr, first_frag, 6, (__u32 *)&ip6->saddr,
			(__u32 *)&ip6->daddr, len, l4_len, allowed, egress);
}

/* Ethernet and VLAN tags, then L3: shared by the XDP (ingress) and TC (egress) programs. */
static __always_inline int parse_frame(void *ctx, void *data, void *data_end, __u64 len, int egress)
{
	__u32 zero = 0;
	struct counters *cs = counters.lookup(&zero);
	if (!cs) /* never: the array's one element always exists */
		return XDP_PASS;
	COUNT(C_TOTAL, len);

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > data_end) {
		COUNT(C_MALFORMED, len);
		return XDP_PASS;
	}
	__u16 proto = bpf_ntohs(eth->h_proto);
	void *cur = eth + 1;
	int tagged = 0;

#pragma unroll
	for (int i = 0; i < MAX_VLAN_TAGS; i++) {
		if (proto != ETH_P_8021Q_ && proto != ETH_P_8021AD_)
			break;
		struct vlan_tag *tag = cur;
		if ((void *)(tag + 1) > data_end) {
			COUNT(C_MALFORMED, len);
			return XDP_PASS;
		}
		proto = bpf_ntohs(tag->encap_proto);
		cur = tag + 1;
		tagged = 1;
	}
	if (tagged)
		COUNT(C_VLAN, len);

	if (proto == ETH_P_IP) {
		COUNT(C_IPV4, len);
		return parse_ipv4(cs, ctx, data, cur, data_end, len, egress);
	} else if (proto == ETH_P_IPV6) {
		COUNT(C_IPV6, len);
		return parse_ipv6(cs, ctx, data, cur, data_end, len, egress);
	} else if (proto == ETH_P_ARP) {
		COUNT(C_ARP, len);
	} else {
		/* Includes VLAN stacks deeper than MAX_VLAN_TAGS. */
		COUNT(C_L3_OTHER, len);
	}
	return XDP_PASS;
}

int xdpwatch(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *data_end = (void *)(long)ctx->data_end;
	return parse_frame(ctx, data, data_end, data_end - data, 0);
}

/* The other direction: packets leaving through the interface (TCX egress), for the SSH
 * flows only. Never changes anything: the verdict is always "next program / pass". */
int xdpwatch_egress(struct __sk_buff *skb)
{
	void *data = (void *)(long)skb->data;
	void *data_end = (void *)(long)skb->data_end;
	/* skb->len: the whole packet (headers are in the linear part we parse; a GSO packet
	 * counts once with its full length, as the interface's own counters do). */
	parse_frame(skb, data, data_end, skb->len, 1);
	return TC_ACT_UNSPEC;
}
