/* Compile-time settings of the xdpwatch XDP program.
 * Each default can be overridden with a -D cflag; the producer passes the values of its
 * command-line options this way (see producer/loader.py). */
#ifndef XDPWATCH_CONFIG_H
#define XDPWATCH_CONFIG_H

/* Maximum number of concurrently tracked SSH flows (LRU hash entries). */
#ifndef FLOW_TABLE_SIZE
#define FLOW_TABLE_SIZE 65536
#endif

/* Ring buffer size in pages (power of two); 64 pages = 256 KiB on 4 KiB pages. */
#ifndef RINGBUF_PAGES
#define RINGBUF_PAGES 64
#endif

/* TCP ports that count as SSH (--ssh-port); the producer passes an OR of comparisons. */
#ifndef IS_SSH_PORT
#define IS_SSH_PORT(p) ((p) == 22)
#endif

/* Most interfaces watched at once (elements of the per-CPU `counters` array; one more, the
 * last, takes packets of an interface being attached or detached). */
#ifndef MAX_IFACES
#define MAX_IFACES 256
#endif

/* Entries of the direct-mapped ifindex -> slot table (a power of two): an interface whose
 * entry (ifindex % IFSLOT_CACHE) is taken by another is found in the `ifslots_more` hash. */
#ifndef IFSLOT_CACHE
#define IFSLOT_CACHE 1024
#endif

/* VLAN tags (802.1Q / 802.1ad) the parser walks through; deeper stacks count as l3_other. */
#ifndef MAX_VLAN_TAGS
#define MAX_VLAN_TAGS 2
#endif

/* IPv6 extension headers the parser walks through before giving up on finding L4. */
#ifndef MAX_IPV6_EXT_HDRS
#define MAX_IPV6_EXT_HDRS 6
#endif

/* Prevention (produce --dry-run / --enforce): 0 = monitor only (no lookups at all),
 * 1 = dry run (count what would be dropped, pass it), 2 = enforce (drop). */
#ifndef ENFORCE_MODE
#define ENFORCE_MODE 0
#endif

/* Most prefixes in each of the block and allow lists (per address family). */
#ifndef BLOCKLIST_SIZE
#define BLOCKLIST_SIZE 16384
#endif

/* New SSH connections (SYNs) per second allowed per source, 0 = no limit (--syn-rate-limit),
 * and how many may come at once (--syn-burst). */
#ifndef SYN_RATE
#define SYN_RATE 0
#endif
#ifndef SYN_BURST
#define SYN_BURST 1
#endif
#ifndef SYN_RATE_TABLE_SIZE
#define SYN_RATE_TABLE_SIZE 65536
#endif

#endif
