/* SSH flows: the flow table entry of each connection (both directions on one key), the TCP
 * handshake check, the first payload of each direction (banners) and the server's first
 * segment sizes, and the flow events on the ring buffer. */
#ifndef XDPWATCH_FLOWS_H
#define XDPWATCH_FLOWS_H

#include <linux/in.h>

#include "maps.h"
#include "pkt.h"

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
	__builtin_memset(e->_pad1, 0, sizeof(e->_pad1));
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
		v->client_isn = tcp_seq(p);
		v->handshake = HS_SYN;
	} else if (p->egress && p->dir == DIR_TO_CLIENT && f == (TH_SYN | TH_ACK) && tcp_ack(p) == v->client_isn + 1) {
		v->server_isn = tcp_seq(p);
		v->handshake = HS_SYN_ACK;
	} else if (hs == HS_SYN_ACK && !p->egress && p->dir == DIR_TO_SERVER && f == TH_ACK &&
		   tcp_ack(p) == v->server_isn + 1) {
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
	/* The payload: the first of each direction (banner), the server's first segment sizes.
	 * Nothing to look at once both are done for this direction. */
	if (!(v->banners & dir) || (dir == DIR_TO_CLIENT && v->nsizes < SERVER_SIZES)) {
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
	}
	if (!(flags & (TH_FIN | TH_RST))) /* one test for the packets that are neither */
		return;
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
	key->ifindex = p->ifindex;
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
	if (v && !(syn && v->rst_ns)) {
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
		nv.client_isn = tcp_seq(p);
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

#endif
