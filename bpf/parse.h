/* Parsing: Ethernet, VLAN tags, IPv4 (options), IPv6 (extension headers), TCP, UDP, into
 * the packet context, counting each packet's classes on the way. Every header is
 * bounds-checked before it is read; a truncated or invalid one is counted as malformed and
 * parsing stops (the packet passes). */
#ifndef XDPWATCH_PARSE_H
#define XDPWATCH_PARSE_H

#include <linux/in.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/ipv6.h>
#include <linux/tcp.h>
#include <linux/udp.h>

#include "config.h"
#include "pkt.h"

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
	/* One 16-bit load: struct ethhdr is packed, so eth->h_proto is read a byte at a time. */
	__u16 proto = bpf_ntohs(*(__be16 *)(p->data + offsetof(struct ethhdr, h_proto)));
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

#endif
