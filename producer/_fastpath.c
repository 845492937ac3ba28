/* The compiled flow path: ring-buffer records -> flow tracking -> the ssh-flows documents.
 *
 * Contract: for the same ring-buffer records and flow-table reads, in the same order, it
 * makes the same documents, byte for byte and in the same order, as the Python reference
 * (producer/flows.py FlowTracker, producer/events.py EventShaper.flow, orjson.dumps,
 * schemas.key_of), with the same event-id sequence and clock, and the same evicted/active
 * counts. The reference stays the specification: tests/unit/test_fastpath.py compares both on
 * a corpus and on generated histories, tests/kernel/test_flowpath.py through the real XDP
 * program. producer/flowpath.py wraps this module (CompiledFlows); read the Python first.
 *
 * Tracker(prefix, observer, idle_ns, active_ns, fin_linger_ns, emit, read, pop, delete,
 *         drain=None, batch=4096, observer_of=None)
 *   record(raw)          FlowTracker.on_event(decode_event(raw))
 *   open_ring(map_fd)    read that BPF ring buffer through libbpf (bcc's own library)
 *   poll(ms, budget)     at most `budget` records, waiting up to `ms` (GIL released) for one
 *   sweep(now_ns), shutdown(now_ns), end_iface(ifindex, now_ns), shape(...), close();
 *   active_by_iface(); seq, offset, evicted, evicted_by_iface, active
 * A flow's `observer` is observer_of(its ifindex) (asked once per interface, until
 * end_iface), or the default `observer` when observer_of is None.
 * Documents go to emit([(kafka key, JSON bytes), ...]) in lists of at most `batch`, before
 * each method returns. read() gives the flow table as (keys, values) chunks of raw records;
 * pop(key) and delete(key) take an entry out of it. Errors raise Python exceptions; the
 * documents made before an error are still emitted.
 *
 * Where the speed comes from: no Python object per record or per flow (flows live in an
 * array with an open-addressing index, keyed by SipHash like a dict), documents written
 * straight into a byte buffer, the Community ID's SHA-1 on the CPU's SHA extensions when it
 * has them, IPv4 addresses formatted without sprintf.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <arpa/inet.h>
#include <errno.h>
#include <linux/types.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#include <immintrin.h>
#define HAVE_X86_SHA 1
#endif

#include "xdpwatch.h"

/* libbpf.so.1 (Debian's libbpf1, a dependency of bcc): the ring-buffer calls, declared
 * here so that the build needs no libbpf-dev. */
struct ring_buffer;
typedef int (*ring_buffer_sample_fn)(void *ctx, void *data, size_t size);
struct ring_buffer *ring_buffer__new(int map_fd, ring_buffer_sample_fn sample_cb, void *ctx, const void *opts);
void ring_buffer__free(struct ring_buffer *rb);
int ring_buffer__consume(struct ring_buffer *rb);
int ring_buffer__epoll_fd(const struct ring_buffer *rb);

typedef __int128 i128;

enum action { A_START, A_ESTABLISHED, A_UPDATE, A_END };
enum reason { R_NONE, R_FIN, R_RST, R_IDLE, R_SHUTDOWN, R_EVICTED };
static const char *const ACTIONS[] = {"flow_start", "flow_established", "flow_update", "flow_end"};
static const char *const TYPES[] = {"[\"connection\",\"start\"]", "[\"connection\",\"info\"]",
                                    "[\"connection\",\"info\"]", "[\"connection\",\"end\"]"};
static const char *const REASONS[] = {NULL, "fin", "rst", "idle", "shutdown", "evicted"};
static const char *const DIRECTIONS[] = {"unknown", "inbound", "outbound", "internal"};
static const char *const HANDSHAKES[] = {"none", "syn", "syn_ack", "complete"};
static const char *const FLAGS[] = {"FIN", "SYN", "RST", "PSH", "ACK", "URG", "ECE", "CWR"};

/* ------------------------------------------------------------------ SHA-1, base64 */
static inline uint32_t rol(uint32_t x, int n) { return (x << n) | (x >> (32 - n)); }

static void sha1_block(uint32_t h[5], const uint8_t *p)
{
    uint32_t w[80], a = h[0], b = h[1], c = h[2], d = h[3], e = h[4];
    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 | (uint32_t)p[4 * i + 2] << 8 | p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        uint32_t f, k;
        if (i < 20) { f = (b & c) | (~b & d); k = 0x5A827999; }
        else if (i < 40) { f = b ^ c ^ d; k = 0x6ED9EBA1; }
        else if (i < 60) { f = (b & c) | (b & d) | (c & d); k = 0x8F1BBCDC; }
        else { f = b ^ c ^ d; k = 0xCA62C1D6; }
        uint32_t tmp = rol(a, 5) + f + e + k + w[i];
        e = d; d = c; c = rol(b, 30); b = a; a = tmp;
    }
    h[0] += a; h[1] += b; h[2] += c; h[3] += d; h[4] += e;
}

#ifdef HAVE_X86_SHA
/* The same with the x86 SHA extensions (a Community ID costs one block: about 10x faster). */
#define SHA_GROUP(Ecur, Eoth, M0, M1, M2, M3, f) \
    Ecur = _mm_sha1nexte_epu32(Ecur, M0);        \
    Eoth = abcd;                                 \
    M1 = _mm_sha1msg2_epu32(M1, M0);             \
    abcd = _mm_sha1rnds4_epu32(abcd, Ecur, f);   \
    M3 = _mm_sha1msg1_epu32(M3, M0);             \
    M2 = _mm_xor_si128(M2, M0);

__attribute__((target("sha,sse4.1"))) static void sha1_block_ni(uint32_t h[5], const uint8_t *p)
{
    const __m128i mask = _mm_set_epi64x(0x0001020304050607ULL, 0x08090a0b0c0d0e0fULL);
    __m128i abcd = _mm_shuffle_epi32(_mm_loadu_si128((const __m128i *)h), 0x1B);
    __m128i e0 = _mm_set_epi32((int)h[4], 0, 0, 0), abcd_save = abcd, e0_save = e0, e1;
    __m128i m0 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)p), mask);
    __m128i m1 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 16)), mask);
    __m128i m2 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 32)), mask);
    __m128i m3 = _mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(p + 48)), mask);
    /* rounds 0-15: the message words as they are */
    e0 = _mm_add_epi32(e0, m0);
    e1 = abcd;
    abcd = _mm_sha1rnds4_epu32(abcd, e0, 0);
    e1 = _mm_sha1nexte_epu32(e1, m1);
    e0 = abcd;
    abcd = _mm_sha1rnds4_epu32(abcd, e1, 0);
    m0 = _mm_sha1msg1_epu32(m0, m1);
    e0 = _mm_sha1nexte_epu32(e0, m2);
    e1 = abcd;
    abcd = _mm_sha1rnds4_epu32(abcd, e0, 0);
    m1 = _mm_sha1msg1_epu32(m1, m2);
    m0 = _mm_xor_si128(m0, m2);
    SHA_GROUP(e1, e0, m3, m0, m1, m2, 0) /* 12-15 */
    SHA_GROUP(e0, e1, m0, m1, m2, m3, 0) /* 16-19 */
    SHA_GROUP(e1, e0, m1, m2, m3, m0, 1)
    SHA_GROUP(e0, e1, m2, m3, m0, m1, 1)
    SHA_GROUP(e1, e0, m3, m0, m1, m2, 1)
    SHA_GROUP(e0, e1, m0, m1, m2, m3, 1)
    SHA_GROUP(e1, e0, m1, m2, m3, m0, 1) /* 36-39 */
    SHA_GROUP(e0, e1, m2, m3, m0, m1, 2)
    SHA_GROUP(e1, e0, m3, m0, m1, m2, 2)
    SHA_GROUP(e0, e1, m0, m1, m2, m3, 2)
    SHA_GROUP(e1, e0, m1, m2, m3, m0, 2)
    SHA_GROUP(e0, e1, m2, m3, m0, m1, 2) /* 56-59 */
    SHA_GROUP(e1, e0, m3, m0, m1, m2, 3)
    SHA_GROUP(e0, e1, m0, m1, m2, m3, 3) /* 64-67 */
    /* 68-79: the last words need no more schedule */
    e1 = _mm_sha1nexte_epu32(e1, m1);
    e0 = abcd;
    m2 = _mm_sha1msg2_epu32(m2, m1);
    abcd = _mm_sha1rnds4_epu32(abcd, e1, 3);
    m3 = _mm_xor_si128(m3, m1);
    e0 = _mm_sha1nexte_epu32(e0, m2);
    e1 = abcd;
    m3 = _mm_sha1msg2_epu32(m3, m2);
    abcd = _mm_sha1rnds4_epu32(abcd, e0, 3);
    e1 = _mm_sha1nexte_epu32(e1, m3);
    e0 = abcd;
    abcd = _mm_sha1rnds4_epu32(abcd, e1, 3);
    e0 = _mm_sha1nexte_epu32(e0, e0_save);
    abcd = _mm_add_epi32(abcd, abcd_save);
    _mm_storeu_si128((__m128i *)h, _mm_shuffle_epi32(abcd, 0x1B));
    h[4] = (uint32_t)_mm_extract_epi32(e0, 3);
}

static int cpu_has_sha_ni(void)
{
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d) || !(b & (1u << 29))) /* SHA */
        return 0;
    return __get_cpuid(1, &a, &b, &c, &d) && (c & (1u << 19)) && (c & (1u << 9)); /* SSE4.1, SSSE3 */
}
#else  /* other CPUs: the portable block function only */
#define sha1_block_ni sha1_block
static int cpu_has_sha_ni(void) { return 0; }
#endif

static int have_sha_ni;

static void sha1_with(const uint8_t *msg, size_t len, uint8_t out[20], int ni)
{
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    void (*block_fn)(uint32_t *, const uint8_t *) = ni ? sha1_block_ni : sha1_block;
    uint8_t block[128] = {0};
    size_t full = len / 64 * 64, rest = len - full;
    for (size_t i = 0; i < full; i += 64)
        block_fn(h, msg + i);
    memcpy(block, msg + full, rest);
    block[rest] = 0x80;
    size_t n = rest < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        block[n - 1 - i] = (uint8_t)(bits >> (8 * i));
    block_fn(h, block);
    if (n == 128)
        block_fn(h, block + 64);
    for (int i = 0; i < 5; i++) {
        out[4 * i] = h[i] >> 24; out[4 * i + 1] = h[i] >> 16; out[4 * i + 2] = h[i] >> 8; out[4 * i + 3] = h[i];
    }
}

static void sha1(const uint8_t *msg, size_t len, uint8_t out[20]) { sha1_with(msg, len, out, have_sha_ni); }

static const char B64[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

/* base64 of 20 bytes: 28 characters, the last one '=' */
static void base64_20(const uint8_t in[20], char out[28])
{
    int o = 0;
    for (int i = 0; i < 18; i += 3) {
        uint32_t v = (uint32_t)in[i] << 16 | (uint32_t)in[i + 1] << 8 | in[i + 2];
        out[o++] = B64[v >> 18]; out[o++] = B64[(v >> 12) & 63]; out[o++] = B64[(v >> 6) & 63]; out[o++] = B64[v & 63];
    }
    uint32_t v = (uint32_t)in[18] << 16 | (uint32_t)in[19] << 8;
    out[o++] = B64[v >> 18]; out[o++] = B64[(v >> 12) & 63]; out[o++] = B64[(v >> 6) & 63]; out[o] = '=';
}

/* ------------------------------------------------------------------ the document writer */
typedef struct {
    char *p, *end;
} W;

#define NEED(w, n) do { if ((size_t)((w)->end - (w)->p) < (size_t)(n)) return -1; } while (0)

static inline __attribute__((always_inline)) int put(W *w, const char *s, size_t n)
{
    NEED(w, n);
    memcpy(w->p, s, n);
    w->p += n;
    return 0;
}
#define PUTS(w, lit) put((w), (lit), sizeof(lit) - 1)

static int put_str(W *w, const char *s) { return put(w, s, strlen(s)); }

static inline int put_u64(W *w, uint64_t v)
{
    char tmp[20];
    int n = 0;
    do { tmp[n++] = (char)('0' + v % 10); v /= 10; } while (v);
    NEED(w, n);
    while (n)
        *w->p++ = tmp[--n];
    return 0;
}

static int put_hex(W *w, uint64_t v)
{
    char tmp[16];
    int n = 0;
    do { tmp[n++] = "0123456789abcdef"[v & 15]; v >>= 4; } while (v);
    NEED(w, n);
    while (n)
        *w->p++ = tmp[--n];
    return 0;
}

/* a - b as Python computes it, written as orjson would: it takes -2^63 .. 2^64-1. */
static int put_diff(W *w, uint64_t a, uint64_t b, int *range_error)
{
    if (a >= b)
        return put_u64(w, a - b);
    uint64_t d = b - a;
    if (d > (uint64_t)1 << 63) {
        *range_error = 1;
        return -1;
    }
    if (PUTS(w, "-"))
        return -1;
    return put_u64(w, d);
}

/* Printable ASCII only (ssh_identification made it so): orjson escapes '"' and '\'. */
static int put_escaped(W *w, const char *s, size_t n)
{
    NEED(w, 2 * n);
    for (size_t i = 0; i < n; i++) {
        if (s[i] == '"' || s[i] == '\\')
            *w->p++ = '\\';
        *w->p++ = s[i];
    }
    return 0;
}

/* ------------------------------------------------------------------ flows */
#define BANNER_CLIENT 1 /* DIR_TO_SERVER: the client's identification */
#define BANNER_SERVER 2 /* DIR_TO_CLIENT */
#define BANNER_OTHER 4  /* a banner event of another direction: makes `banners` non-empty */

typedef struct {
    uint8_t mask;
    uint8_t len[2];
    uint8_t data[2][BANNER_MAX];
} Banners;

/* One tracked flow (flows._Tracked). */
typedef struct {
    struct flow_key key;
    struct flow_value val; /* the last counts read */
    i128 last_report_ns;
    uint64_t first_ns;     /* which instance of the 5-tuple this is */
    uint64_t generation;   /* sweep generation in which we learned of it */
    uint64_t stamp;        /* the last sweep generation that found it in the table */
    uint64_t hash;
    Banners *banners;      /* NULL until a banner arrives (most flows never send one) */
    uint8_t live, ended, established;
} Flow;

/* The tracked flows: FlowTracker._flows, a dict, made to measure. Flows sit in an array in
 * the order they were learned, as a dict keeps its items: replacing a flow keeps its place,
 * deleting one leaves a hole (closed up later), adding one appends. An open-addressing index
 * of (hash tag, position) finds them by key; the hash is SipHash-1-3 with a random key, as
 * Python's own for bytes, so that clients choosing their addresses and ports cannot make
 * lookups collide. Adding a flow may move them all: no Flow pointer is kept across one. */
typedef struct {
    Flow *flows;
    size_t n, cap, live; /* used (holes included), allocated, live */
    uint64_t *index;     /* 0: empty, TOMB: deleted, else hash tag << 32 | position + 1 */
    size_t mask, used;   /* index size - 1; slots not empty (tombstones included) */
    uint64_t k0, k1;
} Table;

#define TOMB UINT64_MAX
#define TAG(h) ((h) >> 32)

#define SIPROUND                                                                         \
    do {                                                                                 \
        v0 += v1; v1 = v1 << 13 | v1 >> 51; v1 ^= v0; v0 = v0 << 32 | v0 >> 32;         \
        v2 += v3; v3 = v3 << 16 | v3 >> 48; v3 ^= v2;                                    \
        v0 += v3; v3 = v3 << 21 | v3 >> 43; v3 ^= v0;                                    \
        v2 += v1; v1 = v1 << 17 | v1 >> 47; v1 ^= v2; v2 = v2 << 32 | v2 >> 32;         \
    } while (0)

/* SipHash-1-3 of a flow key. */
static uint64_t key_hash(const Table *tb, const struct flow_key *k)
{
    enum { WORDS = sizeof *k / 8, TAIL = sizeof *k % 8 };
    uint64_t v0 = tb->k0 ^ 0x736f6d6570736575ULL, v1 = tb->k1 ^ 0x646f72616e646f6dULL;
    uint64_t v2 = tb->k0 ^ 0x6c7967656e657261ULL, v3 = tb->k1 ^ 0x7465646279746573ULL;
    uint64_t m[WORDS], tail = 0;
    memcpy(m, k, sizeof m);
    memcpy(&tail, (const char *)k + sizeof m, TAIL); /* little-endian, as SipHash reads it */
    for (int i = 0; i < WORDS; i++) {
        v3 ^= m[i];
        SIPROUND;
        v0 ^= m[i];
    }
    uint64_t b = (uint64_t)sizeof *k << 56 | tail;
    v3 ^= b;
    SIPROUND;
    v0 ^= b;
    v2 ^= 0xff;
    SIPROUND; SIPROUND; SIPROUND;
    return v0 ^ v1 ^ v2 ^ v3;
}

static Flow *table_find(const Table *tb, const struct flow_key *k, uint64_t h)
{
    for (size_t i = h & tb->mask;; i = (i + 1) & tb->mask) {
        uint64_t s = tb->index[i];
        if (!s)
            return NULL;
        if (s != TOMB && s >> 32 == TAG(h)) {
            Flow *f = &tb->flows[(uint32_t)s - 1];
            if (!memcmp(&f->key, k, sizeof *k))
                return f;
        }
    }
}

static void index_put(Table *tb, uint64_t h, size_t pos)
{
    size_t i = h & tb->mask;
    while (tb->index[i] && tb->index[i] != TOMB)
        i = (i + 1) & tb->mask;
    if (!tb->index[i])
        tb->used++;
    tb->index[i] = TAG(h) << 32 | (pos + 1);
}

/* Close the holes (keeping the order) and build an index for `want` flows. */
static int table_rebuild(Table *tb, size_t want)
{
    size_t slots = 16;
    while (slots < 2 * want + 2)
        slots *= 2;
    uint64_t *index = PyMem_Calloc(slots, sizeof *index);
    if (!index) {
        PyErr_NoMemory();
        return -1;
    }
    size_t n = 0;
    for (size_t i = 0; i < tb->n; i++)
        if (tb->flows[i].live)
            tb->flows[n++] = tb->flows[i];
    PyMem_Free(tb->index);
    tb->index = index;
    tb->mask = slots - 1;
    tb->n = n;
    tb->used = 0;
    for (size_t i = 0; i < n; i++)
        index_put(tb, tb->flows[i].hash, i);
    return 0;
}

/* A new flow at the end (the key is not in the table): its place, or NULL. */
static Flow *table_append(Table *tb, const struct flow_key *k, uint64_t h)
{
    if (tb->n == tb->cap) {
        if (tb->live <= tb->cap / 2 && tb->live < tb->n) {
            if (table_rebuild(tb, tb->cap))
                return NULL;
        } else {
            size_t cap = tb->cap ? 2 * tb->cap : 64;
            Flow *flows = PyMem_Realloc(tb->flows, cap * sizeof *flows);
            if (!flows) {
                PyErr_NoMemory();
                return NULL;
            }
            tb->flows = flows;
            tb->cap = cap;
        }
    }
    if (2 * (tb->used + 1) > tb->mask + 1 && table_rebuild(tb, tb->cap))
        return NULL;
    Flow *f = &tb->flows[tb->n];
    memset(f, 0, sizeof *f);
    f->key = *k;
    f->hash = h;
    f->live = 1;
    index_put(tb, h, tb->n);
    tb->n++;
    tb->live++;
    return f;
}

static void table_delete(Table *tb, Flow *f)
{
    size_t pos = (size_t)(f - tb->flows);
    for (size_t i = f->hash & tb->mask;; i = (i + 1) & tb->mask)
        if (tb->index[i] != TOMB && (uint32_t)tb->index[i] == pos + 1) {
            tb->index[i] = TOMB;
            break;
        }
    PyMem_Free(f->banners);
    f->banners = NULL;
    f->live = 0;
    tb->live--;
}

static void table_clear(Table *tb)
{
    for (size_t i = 0; i < tb->n; i++)
        PyMem_Free(tb->flows[i].banners);
    PyMem_Free(tb->flows);
    PyMem_Free(tb->index);
    tb->flows = NULL;
    tb->index = NULL;
    tb->n = tb->cap = tb->live = tb->used = 0;
    tb->mask = 0;
}

static int table_init(Table *tb)
{
    uint64_t key[2];
    if (_PyOS_URandom(key, sizeof key))
        return -1;
    tb->k0 = key[0];
    tb->k1 = key[1];
    return table_rebuild(tb, 0);
}

/* ------------------------------------------------------------------ the tracker */
#define CB_ERROR (-1001) /* a ring-buffer callback failed: a Python exception is set */
#define CB_STOP (-1002)  /* the poll's budget of records is used up */

typedef struct {
    PyObject_HEAD
    Table flows;     /* FlowTracker._flows */
    int ready;
    PyObject *out;   /* (kafka key, document) pairs not yet emitted */
    PyObject *emit, *read, *pop, *delete, *drain;
    char *prefix;    /* the event id prefix, JSON-escaped (orjson.dumps(prefix)[1:-1]) */
    Py_ssize_t prefix_len;
    char *observer;  /* orjson.dumps(EventShaper's default observer) */
    Py_ssize_t observer_len;
    PyObject *observer_of;  /* ifindex -> orjson.dumps(its observer), or None: the default for all */
    PyObject *observers;    /* {ifindex: observer bytes}: observer_of's answers, until end_iface */
    PyObject *evicted_by_iface; /* {ifindex: evictions}, cumulative (FlowTracker.evicted_by_iface) */
    unsigned long long seq;    /* EventShaper's sequence: the last id given */
    long long offset;          /* Clock: wall ns - monotonic ns */
    long long idle_ns, active_ns, linger_ns;
    unsigned long long generation, evicted;
    Py_ssize_t batch;
    struct ring_buffer *rb;
    int epfd;
    Py_ssize_t budget, consumed;
    char *buf;
    size_t cap;
    long long tsec; /* the second whose "YYYY-MM-DDTHH:MM:SS." is in tprefix */
    int tvalid;
    char tprefix[24];
} Tracker;

/* ISO 8601 UTC with microseconds of monotonic `mono` (as events.iso(clock.wall_ns(mono))):
 * 27 characters into out. */
static int fmt_time(Tracker *t, char out[27], uint64_t mono)
{
    i128 wall = (i128)mono + t->offset;
    i128 secs = wall / 1000000000, rem = wall % 1000000000;
    if (rem < 0) {
        rem += 1000000000;
        secs -= 1;
    }
    if (!t->tvalid || secs != t->tsec) {
        struct tm tm;
        time_t s = (time_t)secs;
        if (secs < -62135596800LL || secs > 253402300799LL || !gmtime_r(&s, &tm) || tm.tm_year + 1900 < 1000) {
            PyErr_Format(PyExc_ValueError, "time out of range for a date-time: %lld s", (long long)secs);
            return -1;
        }
        snprintf(t->tprefix, sizeof t->tprefix, "%04d-%02d-%02dT%02d:%02d:%02d.", tm.tm_year + 1900, tm.tm_mon + 1,
                 tm.tm_mday, tm.tm_hour, tm.tm_min, tm.tm_sec);
        t->tsec = (long long)secs;
        t->tvalid = 1;
    }
    memcpy(out, t->tprefix, 20);
    unsigned us = (unsigned)(rem / 1000);
    for (int i = 25; i >= 20; i--) {
        out[i] = (char)('0' + us % 10);
        us /= 10;
    }
    out[26] = 'Z';
    return 0;
}

/* ssh.ssh_identification(raw) as JSON. */
static int put_identification(W *w, const uint8_t *raw, size_t n)
{
    char text[BANNER_MAX];
    const uint8_t *nl = memchr(raw, '\n', n);
    size_t len = nl ? (size_t)(nl - raw) : n;
    while (len && raw[len - 1] == '\r')
        len--;
    for (size_t i = 0; i < len; i++)
        text[i] = raw[i] >= 0x20 && raw[i] < 0x7F ? (char)raw[i] : '?';
    if (PUTS(w, "{\"banner\":\"") || put_escaped(w, text, len) || PUTS(w, "\",\"truncated\":")
        || (nl ? PUTS(w, "false") : PUTS(w, "true")))
        return -1;
    if (len >= 4 && memcmp(text, "SSH-", 4) == 0) {
        const char *rest = text + 4, *stop = text + len;
        const char *dash = memchr(rest, '-', (size_t)(stop - rest));
        const char *proto_end = dash ? dash : stop;
        const char *sw = dash ? dash + 1 : stop;
        const char *space = memchr(sw, ' ', (size_t)(stop - sw));
        const char *sw_end = space ? space : stop;
        const char *comments = space ? space + 1 : stop;
        if (PUTS(w, ",\"protocol\":\"") || put_escaped(w, rest, (size_t)(proto_end - rest)) || PUTS(w, "\""))
            return -1;
        if (sw_end > sw && (PUTS(w, ",\"software\":\"") || put_escaped(w, sw, (size_t)(sw_end - sw)) || PUTS(w, "\"")))
            return -1;
        if (stop > comments
            && (PUTS(w, ",\"comments\":\"") || put_escaped(w, comments, (size_t)(stop - comments)) || PUTS(w, "\"")))
            return -1;
    }
    return PUTS(w, "}");
}

/* ssh.login_outcome(list(v.server_sizes[:v.nsizes]), ended) as JSON. */
static int put_outcome(W *w, const struct flow_value *v, int ended)
{
    int n = v->nsizes < SERVER_SIZES ? v->nsizes : SERVER_SIZES;
    unsigned long failures = 0;
    if (n < 5)
        return PUTS(w, "{\"outcome\":\"unknown\",\"failures\":0}");
    uint16_t first_failure = v->server_sizes[4];
    for (int i = 5; i < n; i++) {
        if (v->server_sizes[i] == first_failure)
            failures++;
        else if (v->server_sizes[i] < first_failure)
            return PUTS(w, "{\"outcome\":\"success\",\"confidence\":\"high\",\"failures\":") || put_u64(w, failures)
                   || PUTS(w, "}");
    }
    if (failures && ended)
        return PUTS(w, "{\"outcome\":\"failure\",\"confidence\":\"medium\",\"failures\":") || put_u64(w, failures)
               || PUTS(w, "}");
    if (n == SERVER_SIZES && (unsigned long)(n - 5) > failures)
        return PUTS(w, "{\"outcome\":\"success\",\"confidence\":\"low\",\"failures\":") || put_u64(w, failures)
               || PUTS(w, "}");
    return PUTS(w, "{\"outcome\":\"unknown\",\"failures\":") || put_u64(w, failures) || PUTS(w, "}");
}

static int key_error(long value)
{
    PyObject *k = PyLong_FromLong(value);
    if (k) {
        PyErr_SetObject(PyExc_KeyError, k);
        Py_DECREF(k);
    }
    return -1;
}

/* socket.inet_ntop: IPv4 written here (glibc's goes through sprintf), IPv6 by libc (its
 * rules for :: and embedded IPv4 are the ones Python's inet_ntop follows). */
static int ip_text(int v4, const uint8_t *addr, char out[INET6_ADDRSTRLEN])
{
    if (!v4)
        return inet_ntop(AF_INET6, addr, out, INET6_ADDRSTRLEN) ? 0 : -1;
    char *p = out;
    for (int i = 0; i < 4; i++) {
        unsigned v = addr[i];
        if (v >= 100)
            *p++ = (char)('0' + v / 100);
        if (v >= 10)
            *p++ = (char)('0' + v / 10 % 10);
        *p++ = (char)('0' + v % 10);
        *p++ = i < 3 ? '.' : '\0';
    }
    return 0;
}

/* The observer of a document about a flow seen on `ifindex` (borrowed bytes; NULL on error):
 * observer_of asked once per interface, until end_iface forgets it. */
static PyObject *observer_for(Tracker *t, uint32_t ifindex)
{
    PyObject *i = PyLong_FromUnsignedLong(ifindex);
    if (!i)
        return NULL;
    PyObject *obs = PyDict_GetItemWithError(t->observers, i);
    if (!obs && !PyErr_Occurred()) {
        if (PyDict_GET_SIZE(t->observers) >= 4096) /* interfaces come and go: keep it bounded */
            PyDict_Clear(t->observers);
        PyObject *made = PyObject_CallOneArg(t->observer_of, i);
        if (made && !PyBytes_Check(made)) {
            PyErr_SetString(PyExc_TypeError, "observer_of must return bytes");
            Py_CLEAR(made);
        }
        if (made && !PyDict_SetItem(t->observers, i, made))
            obs = made; /* the dict holds it */
        Py_XDECREF(made);
    }
    Py_DECREF(i);
    return obs;
}

/* EventShaper.flow -> orjson.dumps, and schemas.key_of: a new (key, document) tuple. */
static PyObject *shape(Tracker *t, int action, int reason, const struct flow_key *k, const struct flow_value *v,
                       const Banners *b)
{
    const char *observer = t->observer;
    Py_ssize_t observer_len = t->observer_len;
    if (t->observer_of != Py_None) {
        PyObject *obs = observer_for(t, k->ifindex);
        if (!obs)
            return NULL;
        observer = PyBytes_AS_STRING(obs);
        observer_len = PyBytes_GET_SIZE(obs);
    }
    int v4 = k->family == 4;
    size_t alen = v4 ? 4 : 16;
    char cip[INET6_ADDRSTRLEN], sip[INET6_ADDRSTRLEN];
    if (ip_text(v4, k->client_addr, cip) || ip_text(v4, k->server_addr, sip)) {
        PyErr_SetFromErrno(PyExc_OSError);
        return NULL;
    }

    /* Community ID v1, seed 0 */
    const uint8_t *src = k->client_addr, *dst = k->server_addr;
    uint16_t sport = k->client_port, dport = k->server_port;
    int c = memcmp(src, dst, alen);
    if (c > 0 || (c == 0 && sport > dport)) {
        const uint8_t *a = src; src = dst; dst = a;
        uint16_t p = sport; sport = dport; dport = p;
    }
    uint8_t msg[40] = {0}, digest[20];
    size_t m = 2;
    memcpy(msg + m, src, alen); m += alen;
    memcpy(msg + m, dst, alen); m += alen;
    msg[m++] = k->proto; msg[m++] = 0;
    msg[m++] = sport >> 8; msg[m++] = sport & 255;
    msg[m++] = dport >> 8; msg[m++] = dport & 255;
    sha1(msg, m, digest);
    char cid[30] = "1:";
    base64_20(digest, cid + 2);

    char start[27], end[27];
    if (fmt_time(t, start, v->first_ns))
        return NULL;
    if (v->last_ns == v->first_ns)
        memcpy(end, start, 27);
    else if (fmt_time(t, end, v->last_ns))
        return NULL;
    unsigned long long seq = ++t->seq;
    if (v->directions > 3)
        return key_error(v->directions), NULL;
    if (v->handshake > 3)
        return key_error(v->handshake), NULL;

    int range_error = 0;
    W w = {t->buf, t->buf + t->cap}, *o = &w;
    if (PUTS(o, "{\"@timestamp\":\"") || put(o, action == A_START ? start : end, 27)
        || PUTS(o, "\",\"event\":{\"id\":\"") || put(o, t->prefix, t->prefix_len) || PUTS(o, "-") || put_u64(o, seq)
        || PUTS(o, "\",\"kind\":\"event\",\"module\":\"xdpwatch\",\"dataset\":\"xdpwatch.ssh_flows\","
                   "\"category\":[\"network\"],\"type\":")
        || put_str(o, TYPES[action]) || PUTS(o, ",\"action\":\"") || put_str(o, ACTIONS[action])
        || PUTS(o, "\",\"start\":\"") || put(o, start, 27) || PUTS(o, "\",\"end\":\"") || put(o, end, 27)
        || PUTS(o, "\",\"duration\":") || put_diff(o, v->last_ns, v->first_ns, &range_error))
        goto fail;
    if (reason != R_NONE && (PUTS(o, ",\"reason\":\"") || put_str(o, REASONS[reason]) || PUTS(o, "\"")))
        goto fail;
    if (PUTS(o, "},\"flow\":{\"id\":\"") || put(o, t->prefix, t->prefix_len) || PUTS(o, "-f") || put_hex(o, v->first_ns)
        || PUTS(o, "-") || put(o, cid + 2, 8) || PUTS(o, "\",\"midstream\":")
        || (v->midstream ? PUTS(o, "true") : PUTS(o, "false"))
        || PUTS(o, "},\"source\":{\"ip\":\"") || put_str(o, cip) || PUTS(o, "\",\"port\":") || put_u64(o, k->client_port)
        || PUTS(o, ",\"packets\":") || put_diff(o, v->packets, v->to_client_packets, &range_error)
        || PUTS(o, ",\"bytes\":") || put_diff(o, v->bytes, v->to_client_bytes, &range_error)
        || PUTS(o, "},\"destination\":{\"ip\":\"") || put_str(o, sip) || PUTS(o, "\",\"port\":")
        || put_u64(o, k->server_port) || PUTS(o, ",\"packets\":") || put_u64(o, v->to_client_packets)
        || PUTS(o, ",\"bytes\":") || put_u64(o, v->to_client_bytes)
        || PUTS(o, "},\"network\":{\"transport\":\"tcp\",\"type\":\"") || (v4 ? PUTS(o, "ipv4") : PUTS(o, "ipv6"))
        || PUTS(o, "\",\"packets\":") || put_u64(o, v->packets) || PUTS(o, ",\"bytes\":") || put_u64(o, v->bytes)
        || PUTS(o, ",\"direction\":\"") || put_str(o, DIRECTIONS[v->directions])
        || PUTS(o, "\",\"community_id\":\"") || put(o, cid, 30) || PUTS(o, "\"},\"tcp\":{\"flags\":["))
        goto fail;
    for (int bit = 0, first = 1; bit < 8; bit++) {
        if (!(v->tcp_flags & (1u << bit)))
            continue;
        if ((!first && PUTS(o, ",")) || PUTS(o, "\"") || put_str(o, FLAGS[bit]) || PUTS(o, "\""))
            goto fail;
        first = 0;
    }
    if (PUTS(o, "],\"handshake\":\"") || put_str(o, HANDSHAKES[v->handshake]) || PUTS(o, "\"},\"observer\":")
        || put(o, observer, observer_len))
        goto fail;
    if (b && b->mask) {
        int first = 1;
        if (PUTS(o, ",\"ssh\":{"))
            goto fail;
        if (b->mask & BANNER_CLIENT) {
            if (PUTS(o, "\"client\":") || put_identification(o, b->data[0], b->len[0]))
                goto fail;
            first = 0;
        }
        if (b->mask & BANNER_SERVER) {
            if ((!first && PUTS(o, ",")) || PUTS(o, "\"server\":") || put_identification(o, b->data[1], b->len[1]))
                goto fail;
            first = 0;
        }
        if ((action == A_UPDATE || action == A_END)
            && ((!first && PUTS(o, ",")) || PUTS(o, "\"auth\":") || put_outcome(o, v, action == A_END)))
            goto fail;
        if (PUTS(o, "}"))
            goto fail;
    }
    if (PUTS(o, "}"))
        goto fail;
    PyObject *doc = PyBytes_FromStringAndSize(t->buf, w.p - t->buf);
    if (!doc)
        return NULL;
    PyObject *key = PyBytes_FromString(cip);
    if (!key) {
        Py_DECREF(doc);
        return NULL;
    }
    PyObject *pair = PyTuple_New(2);
    if (!pair) {
        Py_DECREF(doc);
        Py_DECREF(key);
        return NULL;
    }
    PyTuple_SET_ITEM(pair, 0, key);
    PyTuple_SET_ITEM(pair, 1, doc);
    return pair;
fail:
    if (range_error)
        PyErr_SetString(PyExc_TypeError, "Integer exceeds 64-bit range");
    else
        PyErr_SetString(PyExc_SystemError, "flow document larger than its buffer");
    return NULL;
}

/* Hand the documents made so far to `emit`. */
static int flush(Tracker *t)
{
    if (PyList_GET_SIZE(t->out) == 0)
        return 0;
    PyObject *docs = t->out;
    t->out = PyList_New(0);
    if (!t->out) {
        t->out = docs;
        return -1;
    }
    PyObject *r = PyObject_CallOneArg(t->emit, docs);
    Py_DECREF(docs);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

/* Flush, keeping an exception already raised (documents made before it still leave). */
static void flush_after_error(Tracker *t)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (flush(t))
        PyErr_Clear();
    PyErr_Restore(type, value, tb);
}

static int report(Tracker *t, int action, int reason, const struct flow_key *k, const struct flow_value *v,
                  const Banners *b)
{
    PyObject *pair = shape(t, action, reason, k, v, b);
    if (!pair)
        return -1;
    int rc = PyList_Append(t->out, pair);
    Py_DECREF(pair);
    if (rc)
        return -1;
    return PyList_GET_SIZE(t->out) >= t->batch ? flush(t) : 0;
}

/* FlowTracker._established */
static int established(Tracker *t, Flow *f, const struct flow_value *v)
{
    if (f->established)
        return 0;
    f->established = 1;
    return report(t, A_ESTABLISHED, R_NONE, &f->key, v, f->banners);
}

/* FlowTracker._end */
static int end(Tracker *t, Flow *f, int reason, const struct flow_value *v)
{
    if (v->handshake == HS_COMPLETE && established(t, f, v))
        return -1;
    f->ended = 1;
    return report(t, A_END, reason, &f->key, v, f->banners);
}

/* d[ifindex] += 1 */
static int count_iface(PyObject *d, uint32_t ifindex)
{
    PyObject *i = PyLong_FromUnsignedLong(ifindex);
    if (!i)
        return -1;
    PyObject *old = PyDict_GetItemWithError(d, i);
    long n = old ? PyLong_AsLong(old) : 0;
    PyObject *nv = (old || !PyErr_Occurred()) && !(n == -1 && PyErr_Occurred()) ? PyLong_FromLong(n + 1) : NULL;
    int rc = nv ? PyDict_SetItem(d, i, nv) : -1;
    Py_XDECREF(nv);
    Py_DECREF(i);
    return rc;
}

/* FlowTracker._evict */
static int evict(Tracker *t, Flow *f)
{
    t->evicted++;
    if (count_iface(t->evicted_by_iface, f->key.ifindex))
        return -1;
    return end(t, f, R_EVICTED, &f->val);
}

/* FlowTracker._start: the new flow, in the place of an old one of the same key (a dict's
 * item keeps its place when replaced), else at the end. NULL on error. The pointer is good
 * until the next start. */
static Flow *start(Tracker *t, const struct flow_key *k, const struct flow_value *v, i128 now)
{
    uint64_t h = key_hash(&t->flows, k);
    Flow *f = table_find(&t->flows, k, h);
    if (f) {
        /* The kernel replaced the entry (table full, or the 5-tuple reused) before we saw
         * the old flow end. */
        if (!f->ended && evict(t, f))
            return NULL;
        PyMem_Free(f->banners);
        memset(f, 0, sizeof *f);
        f->key = *k;
        f->hash = h;
        f->live = 1;
    } else if (!(f = table_append(&t->flows, k, h))) {
        return NULL;
    }
    f->val = *v;
    f->first_ns = v->first_ns;
    f->generation = t->generation;
    f->last_report_ns = now;
    return report(t, A_START, R_NONE, k, v, NULL) ? NULL : f;
}

static Flow *find(Tracker *t, const struct flow_key *k)
{
    return table_find(&t->flows, k, key_hash(&t->flows, k));
}

/* FlowTracker.on_event on one ring-buffer record. */
static int on_record(Tracker *t, const void *data, size_t size)
{
    if (size < sizeof(struct flow_event)) {
        PyErr_Format(PyExc_ValueError, "ring-buffer record of %zu bytes, expected %zu", size, sizeof(struct flow_event));
        return -1;
    }
    __u32 kind;
    memcpy(&kind, (const char *)data + offsetof(struct flow_event, type), sizeof kind);
    if (kind == EV_BANNER) {
        /* It follows its flow's start event in the ring buffer; if that was dropped and no
         * sweep has adopted the flow yet, the banner is lost with it. */
        struct banner_event ev;
        memcpy(&ev, data, sizeof ev);
        Flow *f = find(t, &ev.key);
        if (!f || f->first_ns != ev.first_ns)
            return 0;
        if (!f->banners && !(f->banners = PyMem_Calloc(1, sizeof(Banners)))) {
            PyErr_NoMemory();
            return -1;
        }
        Banners *b = f->banners;
        int slot = ev.dir == DIR_TO_SERVER ? 0 : ev.dir == DIR_TO_CLIENT ? 1 : -1;
        if (slot < 0) {
            b->mask |= BANNER_OTHER;
        } else if (!(b->mask & (1 << slot))) { /* setdefault: the first one stays */
            b->mask |= 1 << slot;
            b->len[slot] = ev.len < BANNER_MAX ? ev.len : BANNER_MAX;
            memcpy(b->data[slot], ev.data, b->len[slot]);
        }
        return 0;
    }
    if (kind != EV_FLOW_START && kind != EV_FLOW_END_RST && kind != EV_FLOW_ESTABLISHED)
        return 0;
    struct flow_event ev;
    memcpy(&ev, data, sizeof ev);
    uint64_t first_ns = ev.val.first_ns;
    Flow *f = find(t, &ev.key);
    if (kind == EV_FLOW_START)
        return f && f->first_ns == first_ns ? 0 : start(t, &ev.key, &ev.val, first_ns) ? 0 : -1;
    /* RST or established: if its start event was lost, still report the start first */
    if ((!f || f->first_ns != first_ns) && !(f = start(t, &ev.key, &ev.val, first_ns)))
        return -1;
    if (f->ended)
        return 0;
    f->val = ev.val;
    return kind == EV_FLOW_ESTABLISHED ? established(t, f, &ev.val) : end(t, f, R_RST, &ev.val);
}

static int ring_cb(void *ctx, void *data, size_t size)
{
    Tracker *t = ctx;
    if (on_record(t, data, size))
        return CB_ERROR;
    if (++t->consumed == t->budget)
        return CB_STOP;
    return 0;
}

/* Read what the ring buffer holds, at most t->budget records (0: all). */
static int consume(Tracker *t)
{
    int rc = ring_buffer__consume(t->rb);
    if (rc == CB_ERROR)
        return -1;
    if (rc < 0 && rc != CB_STOP) {
        errno = -rc;
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* FlowTracker.drain: the ring buffer's records until it is empty, or the `drain` callable. */
static int drain(Tracker *t)
{
    if (t->rb) {
        t->budget = 0;
        t->consumed = 0;
        return consume(t);
    }
    if (t->drain == Py_None)
        return 0;
    PyObject *r = PyObject_CallNoArgs(t->drain);
    if (!r)
        return -1;
    Py_DECREF(r);
    return 0;
}

static int get_now(PyObject *arg, i128 *now)
{
    long long v = PyLong_AsLongLong(arg);
    if (v == -1 && PyErr_Occurred())
        return -1;
    *now = v;
    return 0;
}

/* table.delete_flow / table.pop_flow through the callables, with the key as bytes. */
static PyObject *call_with_key(PyObject *fn, const struct flow_key *k)
{
    PyObject *kb = PyBytes_FromStringAndSize((const char *)k, sizeof *k);
    if (!kb)
        return NULL;
    PyObject *r = PyObject_CallOneArg(fn, kb);
    Py_DECREF(kb);
    return r;
}

/* FlowTracker._finish */
static int finish(Tracker *t, Flow *f, int reason)
{
    PyObject *final = call_with_key(t->pop, &f->key);
    if (!final)
        return -1;
    const struct flow_value *v = &f->val;
    struct flow_value popped;
    if (final != Py_None) {
        if (!PyBytes_Check(final) || PyBytes_GET_SIZE(final) != sizeof popped) {
            Py_DECREF(final);
            PyErr_SetString(PyExc_TypeError, "pop must return a flow value's bytes or None");
            return -1;
        }
        memcpy(&popped, PyBytes_AS_STRING(final), sizeof popped);
        if (popped.first_ns == f->first_ns)
            v = &popped; /* else evicted or replaced between read and delete: the last counts read */
    }
    Py_DECREF(final);
    if (end(t, f, reason, v))
        return -1;
    table_delete(&t->flows, f);
    return 0;
}

/* One record of the table (FlowTracker.sweep's loop body); h: the hash of its key. */
static int sweep_one(Tracker *t, const char *kp, const char *vp, uint64_t h, i128 now)
{
    struct flow_key key;
    struct flow_value val;
    memcpy(&key, kp, sizeof key);
    memcpy(&val, vp, sizeof val);
    Flow *f = table_find(&t->flows, &key, h);
    if (f && val.first_ns < f->first_ns) { /* we read an older instance than the one we know */
        f->stamp = t->generation;
        return 0;
    }
    if ((!f || val.first_ns > f->first_ns) && !(f = start(t, &key, &val, now))) /* its start event was dropped */
        return -1;
    f->stamp = t->generation;
    if (!f->ended) {
        f->val = val;
        if (val.handshake == HS_COMPLETE && !f->established && established(t, f, &val)) /* its event was dropped */
            return -1;
    }
    if (val.rst_ns) {
        if (!f->ended && end(t, f, R_RST, &val)) /* the kernel's RST event was dropped */
            return -1;
        PyObject *r = call_with_key(t->delete, &f->key);
        if (!r)
            return -1;
        Py_DECREF(r);
        table_delete(&t->flows, f);
        return 0;
    }
    if (val.fin_ns && now - (i128)val.fin_ns >= t->linger_ns)
        return finish(t, f, R_FIN);
    if (now - (i128)val.last_ns >= t->idle_ns)
        return finish(t, f, R_IDLE);
    if (now - f->last_report_ns >= t->active_ns) {
        f->last_report_ns = now;
        return report(t, A_UPDATE, R_NONE, &f->key, &val, f->banners);
    }
    return 0;
}

static int do_sweep(Tracker *t, i128 now)
{
    if (drain(t))
        return -1;
    t->generation++;
    PyObject *chunks = PyObject_CallNoArgs(t->read);
    if (!chunks)
        return -1;
    PyObject *seq = PySequence_Fast(chunks, "read must return a sequence of (keys, values) bytes pairs");
    Py_DECREF(chunks);
    if (!seq)
        return -1;
    int rc = -1;
    if (drain(t)) /* events queued while we read belong to the new generation */
        goto out;
    for (Py_ssize_t i = 0; i < PySequence_Fast_GET_SIZE(seq); i++) {
        PyObject *pair = PySequence_Fast_GET_ITEM(seq, i);
        char *ks, *vs;
        Py_ssize_t kn, vn;
        if (!PyTuple_Check(pair) || PyTuple_GET_SIZE(pair) != 2 || PyBytes_AsStringAndSize(PyTuple_GET_ITEM(pair, 0), &ks, &kn)
            || PyBytes_AsStringAndSize(PyTuple_GET_ITEM(pair, 1), &vs, &vn)) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_TypeError, "read must return (keys, values) bytes pairs");
            goto out;
        }
        Py_ssize_t n = kn / (Py_ssize_t)sizeof(struct flow_key);
        if (kn % (Py_ssize_t)sizeof(struct flow_key) || vn != n * (Py_ssize_t)sizeof(struct flow_value)) {
            PyErr_SetString(PyExc_ValueError, "keys and values of a table read do not pair up");
            goto out;
        }
        for (Py_ssize_t j = 0; j < n; j++) {
            const char *kp = ks + j * sizeof(struct flow_key);
            if (sweep_one(t, kp, vs + j * sizeof(struct flow_value), key_hash(&t->flows, (const struct flow_key *)kp), now))
                goto out;
        }
    }
    /* Gone from the table (or learned of during the read), in the order learned. Nothing
     * is added meanwhile: the places stay. */
    Table *tb = &t->flows;
    for (size_t i = 0; i < tb->n; i++) {
        Flow *f = &tb->flows[i];
        if (!f->live || f->stamp == t->generation || f->generation >= t->generation)
            continue;
        if (!f->ended && evict(t, f))
            goto out;
        table_delete(tb, f);
    }
    rc = 0;
out:
    Py_DECREF(seq);
    return rc;
}

/* ------------------------------------------------------------------ Python methods */
static int Tracker_init(Tracker *t, PyObject *args, PyObject *kw)
{
    static char *kws[] = {"prefix", "observer", "idle_ns", "active_ns", "fin_linger_ns", "emit", "read", "pop",
                          "delete", "drain", "batch", "observer_of", NULL};
    const char *prefix, *observer;
    Py_ssize_t plen, olen, batch = 4096;
    PyObject *drain_cb = Py_None, *observer_of = Py_None;
    PyObject *emit, *read, *pop, *del;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y#y#LLLOOOO|OnO", kws, &prefix, &plen, &observer, &olen, &t->idle_ns,
                                     &t->active_ns, &t->linger_ns, &emit, &read, &pop, &del, &drain_cb, &batch,
                                     &observer_of))
        return -1;
    if (batch < 1) {
        PyErr_SetString(PyExc_ValueError, "batch must be at least 1");
        return -1;
    }
    if (t->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Tracker already initialised");
        return -1;
    }
    if (table_init(&t->flows))
        return -1;
    t->out = PyList_New(0);
    t->observers = PyDict_New();
    t->evicted_by_iface = PyDict_New();
    /* an interface's observer: the default one and its name (IFNAMSIZ, escaped at most 6x) */
    t->cap = 8192 + 2 * (size_t)plen + (size_t)olen + 256;
    t->buf = PyMem_Malloc(t->cap);
    t->prefix = PyMem_Malloc((size_t)plen + 1);
    t->observer = PyMem_Malloc((size_t)olen + 1);
    if (!t->out || !t->observers || !t->evicted_by_iface || !t->buf || !t->prefix || !t->observer) {
        PyErr_NoMemory();
        return -1;
    }
    memcpy(t->prefix, prefix, (size_t)plen);
    memcpy(t->observer, observer, (size_t)olen);
    t->prefix_len = plen;
    t->observer_len = olen;
    t->batch = batch;
    t->epfd = -1;
    Py_INCREF(emit); t->emit = emit;
    Py_INCREF(read); t->read = read;
    Py_INCREF(pop); t->pop = pop;
    Py_INCREF(del); t->delete = del;
    Py_INCREF(drain_cb); t->drain = drain_cb;
    Py_INCREF(observer_of); t->observer_of = observer_of;
    t->ready = 1;
    return 0;
}

static int Tracker_traverse(Tracker *t, visitproc visit, void *arg)
{
    Py_VISIT(t->out);
    Py_VISIT(t->emit);
    Py_VISIT(t->read);
    Py_VISIT(t->pop);
    Py_VISIT(t->delete);
    Py_VISIT(t->drain);
    Py_VISIT(t->observer_of);
    Py_VISIT(t->observers);
    Py_VISIT(t->evicted_by_iface);
    return 0;
}

static int Tracker_clear(Tracker *t)
{
    Py_CLEAR(t->out);
    Py_CLEAR(t->emit);
    Py_CLEAR(t->read);
    Py_CLEAR(t->pop);
    Py_CLEAR(t->delete);
    Py_CLEAR(t->drain);
    Py_CLEAR(t->observer_of);
    Py_CLEAR(t->observers);
    Py_CLEAR(t->evicted_by_iface);
    return 0;
}

static void Tracker_dealloc(Tracker *t)
{
    PyObject_GC_UnTrack(t);
    if (t->rb)
        ring_buffer__free(t->rb);
    Tracker_clear(t);
    table_clear(&t->flows);
    PyMem_Free(t->buf);
    PyMem_Free(t->prefix);
    PyMem_Free(t->observer);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static int ready(Tracker *t)
{
    if (!t->ready || !t->out) {
        PyErr_SetString(PyExc_RuntimeError, "Tracker not initialised");
        return -1;
    }
    return 0;
}

static PyObject *done(Tracker *t, int rc, PyObject *result)
{
    if (rc) {
        flush_after_error(t);
        Py_XDECREF(result);
        return NULL;
    }
    if (flush(t)) {
        Py_XDECREF(result);
        return NULL;
    }
    return result;
}

static PyObject *Tracker_record(Tracker *t, PyObject *arg)
{
    Py_buffer view;
    if (ready(t) || PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE))
        return NULL;
    int rc = on_record(t, view.buf, (size_t)view.len);
    PyBuffer_Release(&view);
    Py_INCREF(Py_None);
    return done(t, rc, Py_None);
}

static PyObject *Tracker_open_ring(Tracker *t, PyObject *arg)
{
    int fd = PyLong_AsLong(arg);
    if (ready(t) || (fd == -1 && PyErr_Occurred()))
        return NULL;
    if (t->rb) {
        PyErr_SetString(PyExc_RuntimeError, "the ring buffer is open already");
        return NULL;
    }
    t->rb = ring_buffer__new(fd, ring_cb, t, NULL);
    if (!t->rb)
        return PyErr_SetFromErrno(PyExc_OSError);
    t->epfd = ring_buffer__epoll_fd(t->rb);
    Py_RETURN_NONE;
}

static PyObject *Tracker_poll(Tracker *t, PyObject *args)
{
    int timeout_ms;
    Py_ssize_t budget;
    if (ready(t) || !PyArg_ParseTuple(args, "in", &timeout_ms, &budget))
        return NULL;
    if (!t->rb) {
        PyErr_SetString(PyExc_RuntimeError, "no ring buffer: open_ring() first");
        return NULL;
    }
    t->budget = budget;
    t->consumed = 0;
    int rc = consume(t);
    if (!rc && t->consumed == 0 && timeout_ms != 0) {
        struct epoll_event ev;
        int n, err;
        Py_BEGIN_ALLOW_THREADS
        n = epoll_wait(t->epfd, &ev, 1, timeout_ms);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n < 0 && err == EINTR) {
            rc = PyErr_CheckSignals();
        } else if (n < 0) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            rc = -1;
        } else if (n > 0) {
            rc = consume(t);
        }
    }
    return done(t, rc, rc ? NULL : PyLong_FromSsize_t(t->consumed));
}

static PyObject *Tracker_sweep(Tracker *t, PyObject *arg)
{
    i128 now;
    if (ready(t) || get_now(arg, &now))
        return NULL;
    int rc = do_sweep(t, now);
    Py_INCREF(Py_None);
    return done(t, rc, Py_None);
}

static PyObject *Tracker_shutdown(Tracker *t, PyObject *arg)
{
    i128 now;
    if (ready(t) || get_now(arg, &now))
        return NULL;
    int rc = do_sweep(t, now);
    Table *tb = &t->flows;
    for (size_t i = 0; !rc && i < tb->n; i++) {
        Flow *f = &tb->flows[i];
        if (f->live && !f->ended)
            rc = end(t, f, R_SHUTDOWN, &f->val);
    }
    if (!rc) {
        table_clear(tb);
        rc = table_rebuild(tb, 0);
    }
    Py_INCREF(Py_None);
    return done(t, rc, Py_None);
}

static int parse_key_value(PyObject *kb, PyObject *vb, struct flow_key *k, struct flow_value *v)
{
    if (!PyBytes_Check(kb) || PyBytes_GET_SIZE(kb) != sizeof *k || !PyBytes_Check(vb) || PyBytes_GET_SIZE(vb) != sizeof *v) {
        PyErr_Format(PyExc_ValueError, "a flow key is %zu bytes and a flow value %zu", sizeof *k, sizeof *v);
        return -1;
    }
    memcpy(k, PyBytes_AS_STRING(kb), sizeof *k);
    memcpy(v, PyBytes_AS_STRING(vb), sizeof *v);
    return 0;
}

/* shape(action, reason, key, value, banners): one document now, as (kafka key, JSON bytes);
 * the sequence moves on as EventShaper's does. For tests: the tracker reports through emit. */
static PyObject *Tracker_shape(Tracker *t, PyObject *args)
{
    const char *action_s, *reason_s = NULL;
    PyObject *kb, *vb, *banners;
    if (ready(t) || !PyArg_ParseTuple(args, "szSSO!", &action_s, &reason_s, &kb, &vb, &PyDict_Type, &banners))
        return NULL;
    int action = -1, reason = R_NONE;
    for (int i = 0; i < 4; i++)
        if (!strcmp(action_s, ACTIONS[i]))
            action = i;
    if (action < 0)
        return PyErr_Format(PyExc_KeyError, "%s", action_s);
    if (reason_s) {
        reason = -1;
        for (int i = 1; i < 6; i++)
            if (!strcmp(reason_s, REASONS[i]))
                reason = i;
        if (reason < 0)
            return PyErr_Format(PyExc_ValueError, "unknown reason %s", reason_s);
    }
    struct flow_key k;
    struct flow_value v;
    if (parse_key_value(kb, vb, &k, &v))
        return NULL;
    Banners b = {0};
    Py_ssize_t pos = 0;
    PyObject *dk, *dv;
    while (PyDict_Next(banners, &pos, &dk, &dv)) {
        long dir = PyLong_AsLong(dk);
        if (dir == -1 && PyErr_Occurred())
            return NULL;
        if (!PyBytes_Check(dv) || PyBytes_GET_SIZE(dv) > BANNER_MAX)
            return PyErr_Format(PyExc_ValueError, "a banner is bytes, at most %d", BANNER_MAX);
        int slot = dir == DIR_TO_SERVER ? 0 : dir == DIR_TO_CLIENT ? 1 : -1;
        if (slot < 0) {
            b.mask |= BANNER_OTHER;
            continue;
        }
        b.mask |= 1 << slot;
        b.len[slot] = (uint8_t)PyBytes_GET_SIZE(dv);
        memcpy(b.data[slot], PyBytes_AS_STRING(dv), b.len[slot]);
    }
    return shape(t, action, reason, &k, &v, &b);
}

static PyObject *Tracker_get_active(Tracker *t, void *closure)
{
    if (ready(t))
        return NULL;
    size_t n = 0;
    for (size_t i = 0; i < t->flows.n; i++)
        n += t->flows.flows[i].live && !t->flows.flows[i].ended;
    return PyLong_FromSize_t(n);
}

static PyObject *Tracker_active_by_iface(Tracker *t, PyObject *unused)
{
    if (ready(t))
        return NULL;
    PyObject *d = PyDict_New();
    for (size_t i = 0; d && i < t->flows.n; i++) {
        const Flow *f = &t->flows.flows[i];
        if (f->live && !f->ended && count_iface(d, f->key.ifindex))
            Py_CLEAR(d);
    }
    return d;
}

/* FlowTracker.end_iface: sweep, then end every open flow of `ifindex` (reason shutdown) and
 * take its entry out of the table; its observer is asked again next time. */
static PyObject *Tracker_end_iface(Tracker *t, PyObject *args)
{
    unsigned int ifindex;
    PyObject *now_arg;
    i128 now;
    if (ready(t) || !PyArg_ParseTuple(args, "IO", &ifindex, &now_arg) || get_now(now_arg, &now))
        return NULL;
    int rc = do_sweep(t, now);
    Table *tb = &t->flows;
    for (size_t i = 0; !rc && i < tb->n; i++) {
        Flow *f = &tb->flows[i];
        if (!f->live || f->key.ifindex != ifindex)
            continue;
        if (f->ended) {
            PyObject *r = call_with_key(t->delete, &f->key);
            rc = r ? 0 : -1;
            Py_XDECREF(r);
            if (!rc)
                table_delete(tb, f);
        } else {
            rc = finish(t, f, R_SHUTDOWN);
        }
    }
    PyObject *i = rc ? NULL : PyLong_FromUnsignedLong(ifindex);
    if (i && PyDict_DelItem(t->observers, i) && PyErr_ExceptionMatches(PyExc_KeyError))
        PyErr_Clear();
    if (!i || PyErr_Occurred())
        rc = -1;
    Py_XDECREF(i);
    Py_INCREF(Py_None);
    return done(t, rc, Py_None);
}

static PyObject *Tracker_close(Tracker *t, PyObject *unused)
{
    if (t->rb) {
        ring_buffer__free(t->rb);
        t->rb = NULL;
        t->epfd = -1;
    }
    Py_RETURN_NONE;
}

static PyMethodDef Tracker_methods[] = {
    {"record", (PyCFunction)Tracker_record, METH_O, "FlowTracker.on_event on one raw ring-buffer record."},
    {"open_ring", (PyCFunction)Tracker_open_ring, METH_O, "Read the BPF ring buffer with this map fd from now on."},
    {"poll", (PyCFunction)Tracker_poll, METH_VARARGS,
     "poll(timeout_ms, budget) -> records: at most `budget` ring-buffer records (0: all), waiting up to timeout_ms "
     "(the GIL released) when there is none."},
    {"sweep", (PyCFunction)Tracker_sweep, METH_O, "FlowTracker.sweep(now_ns)."},
    {"shutdown", (PyCFunction)Tracker_shutdown, METH_O, "FlowTracker.shutdown(now_ns)."},
    {"shape", (PyCFunction)Tracker_shape, METH_VARARGS,
     "shape(action, reason, key, value, banners) -> (kafka key, document): EventShaper.flow + orjson.dumps."},
    {"active_by_iface", (PyCFunction)Tracker_active_by_iface, METH_NOARGS,
     "FlowTracker.active_by_iface(): {ifindex: open flows}."},
    {"end_iface", (PyCFunction)Tracker_end_iface, METH_VARARGS, "FlowTracker.end_iface(ifindex, now_ns)."},
    {"close", (PyCFunction)Tracker_close, METH_NOARGS, "Let go of the ring buffer."},
    {NULL},
};

static PyMemberDef Tracker_members[] = {
    {"seq", T_ULONGLONG, offsetof(Tracker, seq), 0, "the last event id's sequence number (EventShaper._seq)"},
    {"offset", T_LONGLONG, offsetof(Tracker, offset), 0, "wall ns - monotonic ns (the Clock's offset)"},
    {"evicted", T_ULONGLONG, offsetof(Tracker, evicted), READONLY, "flows pushed out of the table, cumulative"},
    {NULL},
};

static PyObject *Tracker_get_evicted_by_iface(Tracker *t, void *closure)
{
    if (ready(t))
        return NULL;
    Py_INCREF(t->evicted_by_iface);
    return t->evicted_by_iface;
}

static PyGetSetDef Tracker_getset[] = {
    {"evicted_by_iface", (getter)Tracker_get_evicted_by_iface, NULL,
     "{ifindex: flows evicted}, cumulative: the dict itself (the caller may drop an interface's entry)", NULL},
    {"active", (getter)Tracker_get_active, NULL, "tracked flows not ended", NULL},
    {NULL},
};

static PyTypeObject TrackerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xdpwatch.producer._fastpath.Tracker",
    .tp_basicsize = sizeof(Tracker),
    .tp_dealloc = (destructor)Tracker_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "FlowTracker + EventShaper.flow + orjson.dumps + schemas.key_of, compiled (see flowpath.py).",
    .tp_traverse = (traverseproc)Tracker_traverse,
    .tp_clear = (inquiry)Tracker_clear,
    .tp_methods = Tracker_methods,
    .tp_members = Tracker_members,
    .tp_getset = Tracker_getset,
    .tp_init = (initproc)Tracker_init,
    .tp_new = PyType_GenericNew,
};

/* sha1(data, portable=False): the digest as the Community ID computes it (tests compare it
 * with hashlib, with and without the CPU's SHA extensions). */
static PyObject *module_sha1(PyObject *m, PyObject *args)
{
    Py_buffer view;
    int portable = 0;
    if (!PyArg_ParseTuple(args, "y*|p", &view, &portable))
        return NULL;
    uint8_t out[20];
    sha1_with(view.buf, (size_t)view.len, out, have_sha_ni && !portable);
    PyBuffer_Release(&view);
    return PyBytes_FromStringAndSize((const char *)out, 20);
}

static PyMethodDef module_methods[] = {
    {"sha1", module_sha1, METH_VARARGS, "sha1(data, portable=False) -> the SHA-1 digest."},
    {NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "The compiled flow path (see producer/flowpath.py).", -1, module_methods,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&TrackerType))
        return NULL;
    have_sha_ni = cpu_has_sha_ni();
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
    if (PyModule_AddIntConstant(m, "SHA_NI", have_sha_ni)) {
        Py_DECREF(m);
        return NULL;
    }
    /* The layout this was built with (bpf/xdpwatch.h): the wrapper checks it against records.py. */
    PyObject *layout = Py_BuildValue(
        "{s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n,s:n}", "flow_key", (Py_ssize_t)sizeof(struct flow_key), "flow_value",
        (Py_ssize_t)sizeof(struct flow_value), "flow_event", (Py_ssize_t)sizeof(struct flow_event), "banner_event",
        (Py_ssize_t)sizeof(struct banner_event), "type", (Py_ssize_t)offsetof(struct flow_event, type), "handshake",
        (Py_ssize_t)offsetof(struct flow_value, handshake), "server_sizes", (Py_ssize_t)offsetof(struct flow_value, server_sizes),
        "banner_len", (Py_ssize_t)offsetof(struct banner_event, len), "banner_dir", (Py_ssize_t)offsetof(struct banner_event, dir));
    if (!layout || PyModule_AddObject(m, "LAYOUT", layout)) {
        Py_XDECREF(layout);
        Py_DECREF(m);
        return NULL;
    }
    Py_INCREF(&TrackerType);
    if (PyModule_AddObject(m, "Tracker", (PyObject *)&TrackerType)) {
        Py_DECREF(&TrackerType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
