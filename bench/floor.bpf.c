// SPDX-License-Identifier: GPL-2.0
/* The design floor of an SSH packet of a known flow (issue 16): what any program that keeps
 * xdpwatch's one flow table with exact counts must do, and nothing else. bench/run.py
 * measures it in the same run as a bare XDP_PASS and the real program, and divides the real
 * program's cost by it.
 *
 * Per packet: one bounds check and the 44-byte key (the interface's index included) at fixed offsets (Ethernet, IPv4 without
 * options, TCP: no VLAN, no IPv6, no port test), one lookup in an LRU hash of the real
 * program's key and value and size, the two atomic adds (packets, bytes) and last_ns from the
 * coarse clock, read once per tick and cached in a per-CPU array element as the real program
 * caches it (bpf/flows.h, coarse_ns()). A packet of an unknown flow inserts it (the benchmark
 * opens the flow once, then measures packets of it). Always XDP_PASS. */
#include <uapi/linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/tcp.h>

#include "xdpwatch.h" /* the real struct flow_key and struct flow_value */

#ifndef FLOW_TABLE_SIZE
#define FLOW_TABLE_SIZE 65536
#endif

struct clock_cache {
	__u64 jiffies;
	__u64 ns;
};

BPF_PERCPU_ARRAY(clock, struct clock_cache, 1);
BPF_TABLE("lru_hash", struct flow_key, struct flow_value, floor_flows, FLOW_TABLE_SIZE);

int floor_prog(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data, *data_end = (void *)(long)ctx->data_end;
	struct iphdr *ip = data + sizeof(struct ethhdr);
	struct tcphdr *tcp = (void *)(ip + 1);
	if ((void *)(tcp + 1) > data_end)
		return XDP_PASS;
	struct flow_key key = {};
	__builtin_memcpy(key.client_addr, &ip->saddr, 4);
	__builtin_memcpy(key.server_addr, &ip->daddr, 4);
	key.client_port = bpf_ntohs(tcp->source);
	key.server_port = bpf_ntohs(tcp->dest);
	key.family = 4;
	key.proto = IPPROTO_TCP;
	key.ifindex = ctx->ingress_ifindex;
	__u64 len = data_end - data;

	struct flow_value *v = floor_flows.lookup(&key);
	if (!v) {
		struct flow_value nv = {.packets = 1, .bytes = len};
		floor_flows.update(&key, &nv);
		return XDP_PASS;
	}
	__sync_fetch_and_add(&v->packets, 1);
	__sync_fetch_and_add(&v->bytes, len);
	__u32 zero = 0;
	struct clock_cache *c = clock.lookup(&zero);
	if (c) {
		__u64 j = bpf_jiffies64();
		if (j != c->jiffies) {
			c->ns = bpf_ktime_get_coarse_ns();
			c->jiffies = j;
		}
		if (c->ns > v->last_ns)
			v->last_ns = c->ns;
	}
	return XDP_PASS;
}
