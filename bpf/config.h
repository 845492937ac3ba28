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

/* VLAN tags (802.1Q / 802.1ad) the parser walks through; deeper stacks count as l3_other. */
#ifndef MAX_VLAN_TAGS
#define MAX_VLAN_TAGS 2
#endif

/* IPv6 extension headers the parser walks through before giving up on finding L4. */
#ifndef MAX_IPV6_EXT_HDRS
#define MAX_IPV6_EXT_HDRS 6
#endif

#endif
