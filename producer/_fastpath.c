/* The compiled flow path: ring-buffer records -> flow tracking -> the ssh-flows documents,
 * byte for byte what producer/flows.py (FlowTracker), producer/events.py (EventShaper.flow),
 * orjson.dumps and schemas.key_of make of them. Those stay the reference:
 * tests/unit/test_fastpath.py runs records and table snapshots through both and compares
 * every document. producer/flowpath.py wraps this module; read the Python first.
 *
 * Tracker(...) holds the flows (a dict: key bytes -> Flow) and hands the documents, as
 * (kafka key, JSON bytes) pairs, to `emit` in lists of at most `batch`. The ring buffer is
 * read through libbpf (ring_buffer__consume, with a C callback), the library bcc uses too.
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

static void sha1(const uint8_t *msg, size_t len, uint8_t out[20])
{
    uint32_t h[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};
    uint8_t block[128] = {0};
    size_t full = len / 64 * 64, rest = len - full;
    for (size_t i = 0; i < full; i += 64)
        sha1_block(h, msg + i);
    memcpy(block, msg + full, rest);
    block[rest] = 0x80;
    size_t n = rest < 56 ? 64 : 128;
    uint64_t bits = (uint64_t)len * 8;
    for (int i = 0; i < 8; i++)
        block[n - 1 - i] = (uint8_t)(bits >> (8 * i));
    sha1_block(h, block);
    if (n == 128)
        sha1_block(h, block + 64);
    for (int i = 0; i < 5; i++) {
        out[4 * i] = h[i] >> 24; out[4 * i + 1] = h[i] >> 16; out[4 * i + 2] = h[i] >> 8; out[4 * i + 3] = h[i];
    }
}

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

static int put(W *w, const char *s, size_t n)
{
    NEED(w, n);
    memcpy(w->p, s, n);
    w->p += n;
    return 0;
}
#define PUTS(w, lit) put((w), (lit), sizeof(lit) - 1)

static int put_str(W *w, const char *s) { return put(w, s, strlen(s)); }

static int put_u64(W *w, uint64_t v)
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

typedef struct {
    PyObject_HEAD
    i128 last_report_ns;
    struct flow_key key;
    struct flow_value val; /* the last counts read */
    uint64_t first_ns;     /* which instance of the 5-tuple this is */
    uint64_t generation;   /* sweep generation in which we learned of it */
    uint64_t stamp;        /* the last sweep generation that found it in the table */
    uint8_t ended, established;
    Banners banners;
} Flow;

static void Flow_dealloc(PyObject *self) { PyObject_Free(self); }

static PyTypeObject FlowType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "xdpwatch.producer._fastpath.Flow",
    .tp_basicsize = sizeof(Flow),
    .tp_dealloc = Flow_dealloc,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "One tracked flow (the C side of flows._Tracked).",
};

/* ------------------------------------------------------------------ the tracker */
#define CB_ERROR (-1001) /* a ring-buffer callback failed: a Python exception is set */
#define CB_STOP (-1002)  /* the poll's budget of records is used up */

typedef struct {
    PyObject_HEAD
    PyObject *flows; /* dict: flow key bytes -> Flow, in the order learned (as FlowTracker._flows) */
    PyObject *out;   /* (kafka key, document) pairs not yet emitted */
    PyObject *emit, *read, *pop, *delete, *drain;
    char *prefix;    /* the event id prefix, JSON-escaped (orjson.dumps(prefix)[1:-1]) */
    Py_ssize_t prefix_len;
    char *observer;  /* orjson.dumps(EventShaper's observer) */
    Py_ssize_t observer_len;
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

/* EventShaper.flow -> orjson.dumps, and schemas.key_of: a new (key, document) tuple. */
static PyObject *shape(Tracker *t, int action, int reason, const struct flow_key *k, const struct flow_value *v,
                       const Banners *b)
{
    int v4 = k->family == 4;
    size_t alen = v4 ? 4 : 16;
    char cip[INET6_ADDRSTRLEN], sip[INET6_ADDRSTRLEN];
    if (!inet_ntop(v4 ? AF_INET : AF_INET6, k->client_addr, cip, sizeof cip)
        || !inet_ntop(v4 ? AF_INET : AF_INET6, k->server_addr, sip, sizeof sip)) {
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
        || put(o, t->observer, t->observer_len))
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
    return report(t, A_ESTABLISHED, R_NONE, &f->key, v, &f->banners);
}

/* FlowTracker._end */
static int end(Tracker *t, Flow *f, int reason, const struct flow_value *v)
{
    if (v->handshake == HS_COMPLETE && established(t, f, v))
        return -1;
    f->ended = 1;
    return report(t, A_END, reason, &f->key, v, &f->banners);
}

/* FlowTracker._evict */
static int evict(Tracker *t, Flow *f)
{
    t->evicted++;
    return end(t, f, R_EVICTED, &f->val);
}

/* FlowTracker._start: the new Flow, owned by the dict (NULL on error). */
static Flow *start(Tracker *t, PyObject *kb, const struct flow_key *k, const struct flow_value *v, i128 now)
{
    Flow *old = (Flow *)PyDict_GetItemWithError(t->flows, kb);
    if (!old && PyErr_Occurred())
        return NULL;
    if (old && !old->ended && evict(t, old))
        return NULL;
    Flow *f = PyObject_New(Flow, &FlowType);
    if (!f)
        return NULL;
    f->last_report_ns = now;
    memcpy(&f->key, k, sizeof *k);
    memcpy(&f->val, v, sizeof *v);
    f->first_ns = v->first_ns;
    f->generation = t->generation;
    f->stamp = 0;
    f->ended = f->established = 0;
    f->banners.mask = 0;
    int rc = PyDict_SetItem(t->flows, kb, (PyObject *)f);
    Py_DECREF(f);
    if (rc || report(t, A_START, R_NONE, k, v, NULL))
        return NULL;
    return f;
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
        struct banner_event ev;
        memcpy(&ev, data, sizeof ev);
        PyObject *kb = PyBytes_FromStringAndSize((const char *)&ev.key, sizeof ev.key);
        if (!kb)
            return -1;
        Flow *f = (Flow *)PyDict_GetItemWithError(t->flows, kb);
        Py_DECREF(kb);
        if (!f)
            return PyErr_Occurred() ? -1 : 0;
        if (f->first_ns != ev.first_ns)
            return 0;
        int slot = ev.dir == DIR_TO_SERVER ? 0 : ev.dir == DIR_TO_CLIENT ? 1 : -1;
        if (slot < 0) {
            f->banners.mask |= BANNER_OTHER;
        } else if (!(f->banners.mask & (1 << slot))) { /* setdefault: the first one stays */
            f->banners.mask |= 1 << slot;
            f->banners.len[slot] = ev.len < BANNER_MAX ? ev.len : BANNER_MAX;
            memcpy(f->banners.data[slot], ev.data, f->banners.len[slot]);
        }
        return 0;
    }
    struct flow_event ev;
    memcpy(&ev, data, sizeof ev);
    if (kind != EV_FLOW_START && kind != EV_FLOW_END_RST && kind != EV_FLOW_ESTABLISHED)
        return 0;
    PyObject *kb = PyBytes_FromStringAndSize((const char *)&ev.key, sizeof ev.key);
    if (!kb)
        return -1;
    int rc = -1;
    uint64_t first_ns = ev.val.first_ns;
    Flow *f = (Flow *)PyDict_GetItemWithError(t->flows, kb);
    if (!f && PyErr_Occurred())
        goto out;
    if (kind == EV_FLOW_START) {
        rc = f && f->first_ns == first_ns ? 0 : start(t, kb, &ev.key, &ev.val, first_ns) ? 0 : -1;
        goto out;
    }
    if ((!f || f->first_ns != first_ns) && !(f = start(t, kb, &ev.key, &ev.val, first_ns)))
        goto out;
    rc = 0;
    if (f->ended)
        goto out;
    f->val = ev.val;
    Py_INCREF(f); /* reports call emit: keep it while we use it */
    rc = kind == EV_FLOW_ESTABLISHED ? established(t, f, &ev.val) : end(t, f, R_RST, &ev.val);
    Py_DECREF(f);
out:
    Py_DECREF(kb);
    return rc;
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

/* FlowTracker._finish */
static int finish(Tracker *t, PyObject *kb, Flow *f, int reason)
{
    PyObject *final = PyObject_CallOneArg(t->pop, kb);
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
            v = &popped;
    }
    Py_DECREF(final);
    Py_INCREF(f);
    int rc = end(t, f, reason, v);
    if (!rc)
        rc = PyDict_DelItem(t->flows, kb);
    Py_DECREF(f);
    return rc;
}

/* One record of the table (FlowTracker.sweep's loop body). */
static int sweep_one(Tracker *t, const char *kp, const char *vp, i128 now)
{
    struct flow_key key;
    struct flow_value val;
    memcpy(&key, kp, sizeof key);
    memcpy(&val, vp, sizeof val);
    PyObject *kb = PyBytes_FromStringAndSize(kp, sizeof key);
    if (!kb)
        return -1;
    int rc = -1;
    Flow *f = (Flow *)PyDict_GetItemWithError(t->flows, kb);
    if (!f && PyErr_Occurred())
        goto out;
    if (f && val.first_ns < f->first_ns) { /* we read an older instance than the one we know */
        f->stamp = t->generation;
        rc = 0;
        goto out;
    }
    if ((!f || val.first_ns > f->first_ns) && !(f = start(t, kb, &key, &val, now))) /* its start event was dropped */
        goto out;
    f->stamp = t->generation;
    Py_INCREF(f); /* reports call emit: keep it while we use it */
    if (!f->ended) {
        f->val = val;
        if (val.handshake == HS_COMPLETE && !f->established && established(t, f, &val))
            goto out_f;
    }
    if (val.rst_ns) {
        if (!f->ended && end(t, f, R_RST, &val))
            goto out_f;
        PyObject *r = PyObject_CallOneArg(t->delete, kb);
        if (!r)
            goto out_f;
        Py_DECREF(r);
        rc = PyDict_DelItem(t->flows, kb);
    } else if (val.fin_ns && now - (i128)val.fin_ns >= t->linger_ns) {
        rc = finish(t, kb, f, R_FIN);
    } else if (now - (i128)val.last_ns >= t->idle_ns) {
        rc = finish(t, kb, f, R_IDLE);
    } else if (now - f->last_report_ns >= t->active_ns) {
        f->last_report_ns = now;
        rc = report(t, A_UPDATE, R_NONE, &f->key, &val, &f->banners);
    } else {
        rc = 0;
    }
out_f:
    Py_DECREF(f);
out:
    Py_DECREF(kb);
    return rc;
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
        for (Py_ssize_t j = 0; j < n; j++)
            if (sweep_one(t, ks + j * sizeof(struct flow_key), vs + j * sizeof(struct flow_value), now))
                goto out;
    }
    /* gone from the table (or learned of during the read), in the order learned */
    PyObject *gone = PyList_New(0);
    if (!gone)
        goto out;
    Py_ssize_t pos = 0;
    PyObject *kb, *fo;
    while (PyDict_Next(t->flows, &pos, &kb, &fo)) {
        Flow *f = (Flow *)fo;
        if (f->stamp != t->generation && f->generation < t->generation && PyList_Append(gone, kb)) {
            Py_DECREF(gone);
            goto out;
        }
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(gone); i++) {
        kb = PyList_GET_ITEM(gone, i);
        Flow *f = (Flow *)PyDict_GetItem(t->flows, kb);
        if ((!f->ended && evict(t, f)) || PyDict_DelItem(t->flows, kb)) {
            Py_DECREF(gone);
            goto out;
        }
    }
    Py_DECREF(gone);
    rc = 0;
out:
    Py_DECREF(seq);
    return rc;
}

/* ------------------------------------------------------------------ Python methods */
static int Tracker_init(Tracker *t, PyObject *args, PyObject *kw)
{
    static char *kws[] = {"prefix", "observer", "idle_ns", "active_ns", "fin_linger_ns", "emit", "read", "pop",
                          "delete", "drain", "batch", NULL};
    const char *prefix, *observer;
    Py_ssize_t plen, olen, batch = 4096;
    PyObject *drain_cb = Py_None;
    PyObject *emit, *read, *pop, *del;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "y#y#LLLOOOO|On", kws, &prefix, &plen, &observer, &olen, &t->idle_ns,
                                     &t->active_ns, &t->linger_ns, &emit, &read, &pop, &del, &drain_cb, &batch))
        return -1;
    if (batch < 1) {
        PyErr_SetString(PyExc_ValueError, "batch must be at least 1");
        return -1;
    }
    if (t->flows) {
        PyErr_SetString(PyExc_RuntimeError, "Tracker already initialised");
        return -1;
    }
    t->flows = PyDict_New();
    t->out = PyList_New(0);
    t->cap = 8192 + 2 * (size_t)plen + (size_t)olen;
    t->buf = PyMem_Malloc(t->cap);
    t->prefix = PyMem_Malloc((size_t)plen + 1);
    t->observer = PyMem_Malloc((size_t)olen + 1);
    if (!t->flows || !t->out || !t->buf || !t->prefix || !t->observer) {
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
    return 0;
}

static int Tracker_traverse(Tracker *t, visitproc visit, void *arg)
{
    Py_VISIT(t->flows);
    Py_VISIT(t->out);
    Py_VISIT(t->emit);
    Py_VISIT(t->read);
    Py_VISIT(t->pop);
    Py_VISIT(t->delete);
    Py_VISIT(t->drain);
    return 0;
}

static int Tracker_clear(Tracker *t)
{
    Py_CLEAR(t->flows);
    Py_CLEAR(t->out);
    Py_CLEAR(t->emit);
    Py_CLEAR(t->read);
    Py_CLEAR(t->pop);
    Py_CLEAR(t->delete);
    Py_CLEAR(t->drain);
    return 0;
}

static void Tracker_dealloc(Tracker *t)
{
    PyObject_GC_UnTrack(t);
    if (t->rb)
        ring_buffer__free(t->rb);
    Tracker_clear(t);
    PyMem_Free(t->buf);
    PyMem_Free(t->prefix);
    PyMem_Free(t->observer);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static int ready(Tracker *t)
{
    if (!t->flows) {
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
    if (!rc) {
        PyObject *flows = PyDict_Values(t->flows);
        rc = flows ? 0 : -1;
        for (Py_ssize_t i = 0; !rc && i < PyList_GET_SIZE(flows); i++) {
            Flow *f = (Flow *)PyList_GET_ITEM(flows, i);
            if (!f->ended)
                rc = end(t, f, R_SHUTDOWN, &f->val);
        }
        Py_XDECREF(flows);
        if (!rc)
            PyDict_Clear(t->flows);
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
    Py_ssize_t pos = 0, n = 0;
    PyObject *kb, *f;
    while (PyDict_Next(t->flows, &pos, &kb, &f))
        n += !((Flow *)f)->ended;
    return PyLong_FromSsize_t(n);
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
    {"close", (PyCFunction)Tracker_close, METH_NOARGS, "Let go of the ring buffer."},
    {NULL},
};

static PyMemberDef Tracker_members[] = {
    {"seq", T_ULONGLONG, offsetof(Tracker, seq), 0, "the last event id's sequence number (EventShaper._seq)"},
    {"offset", T_LONGLONG, offsetof(Tracker, offset), 0, "wall ns - monotonic ns (the Clock's offset)"},
    {"evicted", T_ULONGLONG, offsetof(Tracker, evicted), READONLY, "flows pushed out of the table, cumulative"},
    {NULL},
};

static PyGetSetDef Tracker_getset[] = {
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

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_fastpath", "The compiled flow path (see producer/flowpath.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__fastpath(void)
{
    if (PyType_Ready(&FlowType) || PyType_Ready(&TrackerType))
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (!m)
        return NULL;
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
