/* The packet context that the stages (parse.h, enforce.h, flows.h) share, and counting. */
#ifndef XDPWATCH_PKT_H
#define XDPWATCH_PKT_H

#include <linux/tcp.h>

#include "xdpwatch.h"

#define TH_FIN 0x01
#define TH_SYN 0x02
#define TH_RST 0x04
#define TH_ACK 0x10

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
	__u32 ifindex;        /* the interface it arrives at (XDP) or leaves through (TC) */
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
	__u8 flags;           /* the TCP flags byte */
};

/* The sequence and acknowledgement numbers, host byte order: read where they are used (the
 * handshake check), after parse_l4() returned 1. */
static __always_inline __u32 tcp_seq(struct pkt *p)
{
	return bpf_ntohl(((struct tcphdr *)p->l4)->seq);
}

static __always_inline __u32 tcp_ack(struct pkt *p)
{
	return bpf_ntohl(((struct tcphdr *)p->l4)->ack_seq);
}

/* One packet of `len` bytes more on counter `idx` (len 0: the counters that count events). */
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

#endif
