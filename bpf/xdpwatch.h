/* Shapes shared by the XDP program and user space (mirrored in producer/records.py with
 * ctypes; tests/unit/test_records.py checks sizes and offsets against this file via the
 * compiled program's BTF-free layout: keep fields largest-first with explicit padding). */
#ifndef XDPWATCH_H
#define XDPWATCH_H

/* Index into struct counters (the per-CPU `counters` map's one element). Keep in sync
 * with producer/records.py. */
enum counter_id {
	C_TOTAL = 0,
	C_IPV4,
	C_IPV6,
	C_ARP,
	C_L3_OTHER,
	C_TCP,
	C_UDP,
	C_ICMP,            /* ICMP and ICMPv6 */
	C_L4_OTHER,
	C_SSH,             /* TCP with source or destination port an SSH port */
	C_MALFORMED,       /* a header was truncated or invalid; the packet was still passed */
	C_VLAN,            /* carried at least one VLAN tag */
	C_FLOWS_STARTED,   /* SSH flow entries created (packets field only) */
	C_RINGBUF_DROPS,   /* flow events lost because the ring buffer was full (packets field only) */
	C_EVENTS_SUBMITTED,/* flow events written to the ring buffer (packets field only) */
	C_BLOCKED,         /* from a blocklisted source: dropped (enforce) or would have been (dry run) */
	C_SYN_LIMITED,     /* SSH SYNs over their source's rate limit: dropped, or would have been */
	NR_COUNTERS,
};

struct counter {
	__u64 packets;
	__u64 bytes;
};

/* One element of the per-CPU `counters` array (one element per watched interface, by its
 * slot: see `ifslots` in maps.h): all of a CPU's counters for that interface side by side,
 * so that a packet looks the map up once, not once per counter it moves. */
struct counters {
	struct counter c[NR_COUNTERS];
	/* Not counters: this CPU's cache of the coarse clock (flows.h, coarse_ns()),
	 * here because this element is looked up for every packet anyway. */
	__u64 clock_jiffies;  /* jiffies when clock_ns was read */
	__u64 clock_ns;       /* bpf_ktime_get_coarse_ns() then */
};

/* 5-tuple of a connection, normalised so both directions share one entry: the server is
 * the side on an SSH port, the client the other. IPv4 uses the first 4 bytes of addrs. */
struct flow_key {
	__u8 client_addr[16];
	__u8 server_addr[16];
	__u16 client_port;    /* host byte order */
	__u16 server_port;    /* host byte order */
	__u8 family;          /* 4 or 6 */
	__u8 proto;           /* IPPROTO_TCP */
	__u8 _pad[2];
	__u32 ifindex;        /* the interface the flow is seen on: one flow per interface (a gateway
	                       * forwarding a connection sees it on two, each with its own counts) */
};

#define SERVER_SIZES 12

struct flow_value {
	__u64 first_ns;       /* bpf_ktime_get_ns() of the first packet */
	__u64 last_ns;        /* ... of the latest packet: precise for a flow's first packet and for FIN and RST,
	                       * bpf_ktime_get_coarse_ns() (a few ms behind) for the others */
	__u64 fin_ns;         /* first FIN seen, 0 if none */
	__u64 rst_ns;         /* first RST seen, 0 if none: the flow has ended */
	__u64 packets;        /* both directions, as far as the hooks see them */
	__u64 bytes;          /* full frame length, Ethernet header included */
	__u64 to_client_packets; /* of those, server -> client */
	__u64 to_client_bytes;
	__u32 tcp_flags;      /* OR of the TCP flags byte of every packet */
	__u32 client_isn;     /* sequence number of the client's SYN (handshake check) */
	__u32 server_isn;     /* ... of the server's SYN-ACK that acknowledged it */
	__u8 midstream;       /* 1 if the first packet seen had no SYN: joined mid-connection */
	__u8 directions;      /* DIR_* bits: which directions were seen on this ingress (not egress) */
	__u8 banners;         /* DIR_* bits: directions whose first payload packet was looked at */
	__u8 nsizes;          /* entries used in server_sizes */
	__u8 handshake;       /* enum handshake: how far the three-way handshake went */
	__u8 _pad;
	/* TCP payload sizes of the server's first SERVER_SIZES segments (banner, key exchange,
	 * then the encrypted authentication replies): user space guesses the login outcome
	 * from them, as Zeek does. */
	__u16 server_sizes[SERVER_SIZES];
	__u8 _pad2[6];
};

/* The TCP three-way handshake as the hooks saw it: evidence that the client's address is
 * real. The client's SYN arrives (XDP); the server's SYN-ACK, acknowledging the client's
 * sequence number, leaves through the same interface (egress hook); the client's ACK
 * arrives acknowledging the server's sequence number. Someone who forges the client's
 * address never receives the SYN-ACK, so cannot acknowledge it (one chance in 2^32 per
 * guess); a SYN-ACK forged from outside arrives at XDP, not at egress, and does not count. */
enum handshake {
	HS_NONE = 0,          /* the first packet seen was not the client's SYN arriving */
	HS_SYN,               /* the client's SYN arrived */
	HS_SYN_ACK,           /* the server's SYN-ACK acknowledging it left */
	HS_COMPLETE,          /* the client acknowledged the server's ISN: EV_FLOW_ESTABLISHED */
};

#define DIR_TO_SERVER 1
#define DIR_TO_CLIENT 2

enum flow_event_type {
	EV_FLOW_START = 1,
	EV_FLOW_END_RST = 2,
	EV_BANNER = 3,        /* a struct banner_event */
	EV_FLOW_ESTABLISHED = 4,
};

/* Bytes of an SSH identification string (RFC 4253 4.2) copied into a banner_event. */
#define BANNER_MAX 88

/* Ring-buffer records: a flow_event, or a banner_event. Both are 160 bytes with `type` at
 * offset 156, which tells them apart. */
struct flow_event {
	struct flow_value val;
	struct flow_key key;
	__u32 type;           /* EV_FLOW_START, EV_FLOW_END_RST, EV_FLOW_ESTABLISHED */
};

/* The first payload bytes of one direction of a flow, when they start with "SSH-". */
struct banner_event {
	struct flow_key key;
	__u8 _pad1[4];
	__u64 first_ns;       /* the flow_value's first_ns: which instance of the 5-tuple */
	__u8 data[BANNER_MAX];
	__u16 len;            /* bytes of data copied (at most BANNER_MAX) */
	__u8 dir;             /* DIR_TO_SERVER: the client's banner; DIR_TO_CLIENT: the server's */
	__u8 _pad;
	__u8 _pad0[8];        /* `type` at the offset it has in flow_event */
	__u32 type;           /* EV_BANNER */
};

/* Where an interface's counters are: the slot user space gave it when it attached. */
struct ifslot {
	__u32 ifindex;        /* 0: a free entry */
	__u32 slot;           /* its element of `counters` */
};

/* Block and allow list keys (LPM tries): prefix length, then the address in network order. */
struct lpm_v4 {
	__u32 prefixlen;
	__u8 addr[4];
};

struct lpm_v6 {
	__u32 prefixlen;
	__u8 addr[16];
};

/* Per blocklist entry: what matched it while it was in place. */
struct block_value {
	__u64 packets;
	__u64 bytes;
};

/* Key of the SYN rate limiter: one source address. */
struct src_key {
	__u8 addr[16];
	__u8 family;
	__u8 _pad[3];
};

#endif
