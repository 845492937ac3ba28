/* Every map of the program (bcc declarations), shared by the XDP and the egress program.
 *
 * Read and written by user space too (producer/loader.py, producer/enforcement.py):
 *   counters   per-CPU array of struct counters, one per watched interface (its slot) and one
 *              more for packets of no known slot: {packets, bytes} per enum counter_id
 *              (and this CPU's cache of the coarse clock)
 *   ifslots    array, direct-mapped by ifindex % IFSLOT_CACHE: {ifindex, slot} of each watched
 *              interface whose entry is free; ifslots_more: hash ifindex -> slot for the others
 *              (user space fills both before it attaches and empties them after it detaches)
 *   flows      LRU hash flow_key -> flow_value; user space ends flows (FIN linger, idle,
 *              shutdown) and deletes them; the kernel only creates and updates entries
 *   events     ring buffer of struct flow_event (flow start, handshake completed, flow end
 *              on RST) and struct banner_event
 *   block_v4/6 LPM tries of blocked source prefixes -> what matched them (user space
 *              adds and removes entries, enforcing their TTL)
 *   allow_v4/6 LPM tries of sources never dropped (loopback, management networks)
 *   syn_rate   LRU hash source -> its SYN budget (GCRA), when SYN_RATE > 0
 *
 * Map calls (flows.lookup(...)) are bcc syntax, rewritten only in the file bcc compiles: the
 * loader compiles the source with every header inlined (producer/loader.py, render_source()).
 */
#ifndef XDPWATCH_MAPS_H
#define XDPWATCH_MAPS_H

#include "config.h"
#include "xdpwatch.h"

BPF_PERCPU_ARRAY(counters, struct counters, MAX_IFACES + 1);
BPF_ARRAY(ifslots, struct ifslot, IFSLOT_CACHE);
BPF_HASH(ifslots_more, __u32, __u32, MAX_IFACES);
BPF_TABLE("lru_hash", struct flow_key, struct flow_value, flows, FLOW_TABLE_SIZE);
BPF_RINGBUF_OUTPUT(events, RINGBUF_PAGES);
BPF_LPM_TRIE(block_v4, struct lpm_v4, struct block_value, BLOCKLIST_SIZE);
BPF_LPM_TRIE(block_v6, struct lpm_v6, struct block_value, BLOCKLIST_SIZE);
BPF_LPM_TRIE(allow_v4, struct lpm_v4, __u8, BLOCKLIST_SIZE);
BPF_LPM_TRIE(allow_v6, struct lpm_v6, __u8, BLOCKLIST_SIZE);
#if SYN_RATE
BPF_TABLE("lru_hash", struct src_key, __u64, syn_rate, SYN_RATE_TABLE_SIZE);
#endif

#endif
