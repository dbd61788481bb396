"""C source of the Hamming kernels, kept in a .py file so it ships with the package without
package-data configuration. Compiled and loaded by :mod:`fashionhash.index._kernel`.

Conventions shared with the Python side:

* codes are ``(n, W)`` uint64 words (packed bytes zero-padded to a multiple of 8), rows are
  positions in that array, ids are the caller's int64 labels;
* results are ordered by (distance, id) ascending — the tie order every backend reproduces;
* ``allowed`` is an optional ``(n,)`` uint8 mask (deleted rows and attribute filters);
* every function is reentrant: Python runs one call per thread on disjoint query ranges
  (ctypes drops the GIL during the call).
"""

SOURCE = r"""
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef int64_t i64;
typedef int32_t i32;
typedef uint64_t u64;
typedef uint32_t u32;
typedef uint8_t u8;

#define POPC(x) ((int)__builtin_popcountll(x))
#define INLINE static inline __attribute__((always_inline))
#define BIG_D 0x7fffffff
#define BIG_I 0x7fffffffffffffffLL
#define MAXM 64
#define PROBE_BATCH 32
#define PREFETCH_AHEAD 8

int fh_abi_version(void) { return 2; }

INLINE int dist_w(const u64 *a, const u64 *b, int W) {
    int d = 0;
    for (int w = 0; w < W; ++w) d += POPC(a[w] ^ b[w]);
    return d;
}

/* ---- bounded max-heap on (distance, id): the root is the worst item kept ---------------- */

INLINE int worse(i32 da, i64 ia, i32 db, i64 ib) { return da > db || (da == db && ia > ib); }

static void sift_down(i32 *hd, i64 *hi, int n, int pos) {
    i32 d = hd[pos];
    i64 id = hi[pos];
    for (;;) {
        int c = 2 * pos + 1;
        if (c >= n) break;
        if (c + 1 < n && worse(hd[c + 1], hi[c + 1], hd[c], hi[c])) c++;
        if (!worse(hd[c], hi[c], d, id)) break;
        hd[pos] = hd[c];
        hi[pos] = hi[c];
        pos = c;
    }
    hd[pos] = d;
    hi[pos] = id;
}

static void sift_up(i32 *hd, i64 *hi, int pos) {
    i32 d = hd[pos];
    i64 id = hi[pos];
    while (pos > 0) {
        int p = (pos - 1) / 2;
        if (!worse(d, id, hd[p], hi[p])) break;
        hd[pos] = hd[p];
        hi[pos] = hi[p];
        pos = p;
    }
    hd[pos] = d;
    hi[pos] = id;
}

typedef struct {
    i32 *d;
    i64 *i;
    int size, k;
    i32 td; /* admission threshold: root distance once full, +inf before */
    i64 ti;
} heap_t;

INLINE void heap_init(heap_t *h, i32 *d, i64 *i, int k) {
    h->d = d; h->i = i; h->size = 0; h->k = k; h->td = BIG_D; h->ti = BIG_I;
}

/* The caller has checked that (d, id) beats the root (or the heap is not full). */
INLINE void heap_offer(heap_t *h, i32 d, i64 id) {
    if (h->size < h->k) {
        h->d[h->size] = d;
        h->i[h->size] = id;
        sift_up(h->d, h->i, h->size);
        h->size++;
    } else {
        h->d[0] = d;
        h->i[0] = id;
        sift_down(h->d, h->i, h->k, 0);
    }
    if (h->size == h->k) { h->td = h->d[0]; h->ti = h->i[0]; }
}

/* Heap-sort in place to ascending (distance, id), then pad with (fill_d, -1). */
static void heap_finish(heap_t *h, i32 fill_d) {
    for (int n = h->size; n > 1; --n) {
        i32 td = h->d[0]; i64 ti = h->i[0];
        h->d[0] = h->d[n - 1]; h->i[0] = h->i[n - 1];
        h->d[n - 1] = td; h->i[n - 1] = ti;
        sift_down(h->d, h->i, n - 1, 0);
    }
    for (int j = h->size; j < h->k; ++j) { h->d[j] = fill_d; h->i[j] = -1; }
}

#define ADMIT(h, d, r)                                                      \
    do {                                                                    \
        if (!allowed || allowed[r]) {                                       \
            i64 id_ = ids[r];                                               \
            if ((h)->size < (h)->k || (d) < (h)->td || id_ < (h)->ti)       \
                heap_offer((h), (d), id_);                                  \
        }                                                                   \
    } while (0)

/* ---- linear scan ---------------------------------------------------------------------- */

/* One query against rows [r0, r1); W is a literal at the call sites so the loop specialises. */
INLINE void scan_block1(heap_t *h, const u64 *codes, const int W, const i64 *ids,
                        const u8 *allowed, const u64 *q, i64 r0, i64 r1) {
    i32 t = h->td;
    for (i64 r = r0; r < r1; ++r) {
        i32 d = dist_w(q, codes + r * W, W);
        if (d <= t) { ADMIT(h, d, r); t = h->td; }
    }
}

/* Four queries share every row load; the admission test is one rarely taken branch. */
INLINE void scan_block4(heap_t *h0, const u64 *codes, const int W, const i64 *ids,
                        const u8 *allowed, const u64 *q, i64 r0, i64 r1) {
    heap_t *h1 = h0 + 1, *h2 = h0 + 2, *h3 = h0 + 3;
    i32 t0 = h0->td, t1 = h1->td, t2 = h2->td, t3 = h3->td;
    for (i64 r = r0; r < r1; ++r) {
        const u64 *c = codes + r * W;
        i32 d0 = dist_w(q, c, W), d1 = dist_w(q + W, c, W);
        i32 d2 = dist_w(q + 2 * W, c, W), d3 = dist_w(q + 3 * W, c, W);
        if ((d0 <= t0) | (d1 <= t1) | (d2 <= t2) | (d3 <= t3)) {
            if (d0 <= t0) { ADMIT(h0, d0, r); t0 = h0->td; }
            if (d1 <= t1) { ADMIT(h1, d1, r); t1 = h1->td; }
            if (d2 <= t2) { ADMIT(h2, d2, r); t2 = h2->td; }
            if (d3 <= t3) { ADMIT(h3, d3, r); t3 = h3->td; }
        }
    }
}

#define QBLOCK 32

/* Exact k-NN by linear scan.  codes (n, W), ids (n,), allowed (n,) or NULL, queries (nq, W)
 * -> out_d, out_i (nq, k) sorted by (distance, id), padded with (fill_d, -1).  A block of
 * queries sweeps row blocks small enough to stay in L1/L2. */
int fh_scan_knn(const u64 *codes, i64 n, int W, const i64 *ids, const u8 *allowed,
                const u64 *queries, i64 nq, int k, i32 fill_d, i32 *out_d, i64 *out_i) {
    if (k <= 0 || nq <= 0) return 0;
    const i64 RB = 8192 / W > 64 ? 8192 / W : 64;
    heap_t hs[QBLOCK];
    for (i64 q0 = 0; q0 < nq; q0 += QBLOCK) {
        i64 q1 = q0 + QBLOCK < nq ? q0 + QBLOCK : nq;
        for (i64 q = q0; q < q1; ++q) heap_init(&hs[q - q0], out_d + q * k, out_i + q * k, k);
        for (i64 r0 = 0; r0 < n; r0 += RB) {
            i64 r1 = r0 + RB < n ? r0 + RB : n;
            i64 q = q0;
            for (; q + 4 <= q1; q += 4) {
                const u64 *qv = queries + q * W;
                heap_t *h = &hs[q - q0];
                switch (W) {
                    case 1: scan_block4(h, codes, 1, ids, allowed, qv, r0, r1); break;
                    case 2: scan_block4(h, codes, 2, ids, allowed, qv, r0, r1); break;
                    case 4: scan_block4(h, codes, 4, ids, allowed, qv, r0, r1); break;
                    default: scan_block4(h, codes, W, ids, allowed, qv, r0, r1); break;
                }
            }
            for (; q < q1; ++q) {
                const u64 *qv = queries + q * W;
                heap_t *h = &hs[q - q0];
                switch (W) {
                    case 1: scan_block1(h, codes, 1, ids, allowed, qv, r0, r1); break;
                    case 2: scan_block1(h, codes, 2, ids, allowed, qv, r0, r1); break;
                    default: scan_block1(h, codes, W, ids, allowed, qv, r0, r1); break;
                }
            }
        }
        for (i64 q = q0; q < q1; ++q) heap_finish(&hs[q - q0], fill_d);
    }
    return 0;
}

/* Every row within `radius`: appends (query, distance, row) triples.  Returns how many
 * queries are complete (< nq when the output would overflow: call again from there with
 * more room); *out_cnt receives the number of triples written. */
i64 fh_scan_radius(const u64 *codes, i64 n, int W, const u8 *allowed, const u64 *queries,
                   i64 nq, int radius, i32 *out_q, i32 *out_d, i64 *out_row, i64 cap,
                   i64 *out_cnt) {
    i64 cnt = 0;
    const i64 RB = 8192 / W > 64 ? 8192 / W : 64;
#define EMIT(qq, dd, rr)                                                    \
    do {                                                                    \
        if (!allowed || allowed[rr]) {                                      \
            if (cnt >= cap) { *out_cnt = start; return q0; }                \
            out_q[cnt] = (i32)(qq); out_d[cnt] = (dd); out_row[cnt] = (rr); cnt++; \
        }                                                                   \
    } while (0)
    for (i64 q0 = 0; q0 < nq; q0 += QBLOCK) {
        i64 q1 = q0 + QBLOCK < nq ? q0 + QBLOCK : nq;
        i64 start = cnt;
        for (i64 r0 = 0; r0 < n; r0 += RB) {
            i64 r1 = r0 + RB < n ? r0 + RB : n;
            i64 q = q0;
            if (W == 1) {
                for (; q + 4 <= q1; q += 4) {
                    u64 a0 = queries[q], a1 = queries[q + 1], a2 = queries[q + 2], a3 = queries[q + 3];
                    for (i64 r = r0; r < r1; ++r) {
                        u64 c = codes[r];
                        int d0 = POPC(a0 ^ c), d1 = POPC(a1 ^ c), d2 = POPC(a2 ^ c), d3 = POPC(a3 ^ c);
                        if ((d0 <= radius) | (d1 <= radius) | (d2 <= radius) | (d3 <= radius)) {
                            if (d0 <= radius) EMIT(q, d0, r);
                            if (d1 <= radius) EMIT(q + 1, d1, r);
                            if (d2 <= radius) EMIT(q + 2, d2, r);
                            if (d3 <= radius) EMIT(q + 3, d3, r);
                        }
                    }
                }
            }
            for (; q < q1; ++q) {
                const u64 *qv = queries + q * W;
                for (i64 r = r0; r < r1; ++r) {
                    int d = dist_w(qv, codes + r * W, W);
                    if (d <= radius) EMIT(q, d, r);
                }
            }
        }
    }
#undef EMIT
    *out_cnt = cnt;
    return nq;
}

/* ---- multi-index hashing (Norouzi, Punjani & Fleet 2012) -------------------------------- */

typedef struct {
    const u64 *codes;     /* (n_total, W) */
    const i64 *ids;       /* (n_total,) */
    const u8 *allowed;    /* (n_total,) or NULL */
    i64 n_indexed;        /* rows [0, n_indexed) are in the tables ... */
    i64 n_total;          /* ... rows [n_indexed, n_total) were added since and are scanned */
    i32 W, m;
    const i32 *start;     /* (m,) first bit of each substring in the flattened words */
    const i32 *len;       /* (m,) substring lengths, <= 32 */
    const u32 *offsets;   /* CSR offsets of all tables, concatenated */
    const i64 *off_base;  /* (m,) where table j's offsets start */
    const u32 *keys;      /* sorted distinct keys of the non-direct tables, concatenated */
    const i64 *key_base;  /* (m,) */
    const i64 *nkeys;     /* (m,) -1: direct table (offsets has 2^len + 1 entries) */
    const i32 *rows;      /* (m, n_indexed) rows grouped by key */
    double budget;        /* per-query work limit before falling back to a scan */
    double probe_cost;    /* cost of one bucket lookup, in scanned-row units */
    double cand_cost;     /* cost of checking one candidate (random access), same units */
} mih_t;

INLINE u32 extract_key(const u64 *v, int start, int len) {
    int w = start >> 6, off = start & 63;
    u64 x = v[w] >> off;
    if (off + len > 64) x |= v[w + 1] << (64 - off);
    return (u32)(x & ((1ULL << len) - 1));
}

INLINE void bucket(const mih_t *t, int j, u32 key, i64 *lo, i64 *hi) {
    const u32 *off = t->offsets + t->off_base[j];
    i64 nk = t->nkeys[j];
    if (nk < 0) { *lo = off[key]; *hi = off[key + 1]; return; }
    const u32 *ks = t->keys + t->key_base[j];
    i64 a = 0, b = nk;
    while (a < b) { i64 mid = (a + b) >> 1; if (ks[mid] < key) a = mid + 1; else b = mid; }
    if (a < nk && ks[a] == key) { *lo = off[a]; *hi = off[a + 1]; } else { *lo = 0; *hi = 0; }
}

/* A row is met once per table, in table i at round s = its substring distance there.  It is
 * handled only at its first meeting, i.e. when (s, i) is the smallest (substring distance,
 * table) pair over all tables; no visited set is needed. */
INLINE int first_meeting(const mih_t *t, const u32 *qk, const u64 *c, int i, int s) {
    for (int j = 0; j < t->m; ++j) {
        if (j == i) continue;
        int sd = POPC((u64)(qk[j] ^ extract_key(c, t->start[j], t->len[j])));
        if (sd < s || (sd == s && j < i)) return 0;
    }
    return 1;
}

static double binom(int n, int k) {
    if (k < 0 || k > n) return 0.0;
    double b = 1.0;
    for (int j = 1; j <= k; ++j) b = b * (double)(n - k + j) / (double)j;
    return b;
}

/* Estimated cost of the rounds from (s, i) on that must run before every row within
 * `target` of the query has been met (bucket sizes as for uniformly spread codes). */
static double cost_to_reach(const mih_t *t, int s, int i, int target) {
    double c = 0.0;
    while (t->m * s + i - 1 < target && s <= 32 && c < 1e300) {
        int L = t->len[i];
        if (s <= L) c += binom(L, s) * (t->probe_cost + ldexp((double)t->n_indexed, -L) * t->cand_cost);
        if (++i == t->m) { i = 0; ++s; }
    }
    return c;
}

/* One query.  k-NN when h != NULL, else radius search appending to (oq, od, orow).
 * Returns 1 when done, 0 when the work budget ran out (the caller scans this query
 * instead), -1 when the radius output is full. */
static int mih_query(const mih_t *t, const u64 *q, heap_t *h, int radius, i32 qi, i32 *oq,
                     i32 *od, i64 *orow, i64 *cnt, i64 cap, i64 *stats) {
    const int m = t->m, W = t->W;
    const u64 *codes = t->codes;
    const u8 *allowed = t->allowed;
    u32 qk[MAXM];
    int maxlen = 0;
    for (int j = 0; j < m; ++j) {
        qk[j] = extract_key(q, t->start[j], t->len[j]);
        if (t->len[j] > maxlen) maxlen = t->len[j];
    }
    double cost = (double)(t->n_total - t->n_indexed);
    i64 ncand = 0, nprobe = 0;
    int rc = 1;
    if (!h) { /* radius: rows added since the build are checked directly (k-NN: caller) */
        for (i64 r = t->n_indexed; r < t->n_total; ++r) {
            i32 d = dist_w(q, codes + r * W, W);
            if (d <= radius && (!allowed || allowed[r])) {
                if (*cnt >= cap) return -1;
                oq[*cnt] = qi; od[*cnt] = d; orow[*cnt] = r; (*cnt)++;
            }
        }
    }
    i64 met[MAXM]; /* rows met so far in each table: a table fully met means all rows seen */
    for (int j = 0; j < m; ++j) met[j] = 0;
    if (t->n_indexed == 0) goto done;
    for (int s = 0; s <= maxlen; ++s) {
        for (int i = 0; i < m; ++i) {
            /* Rows not met yet differ in >= s+1 bits on tables < i and >= s bits on the
             * others, so every row within m*s + i - 1 of q has been met. */
            int complete = m * s + i - 1;
            if (h) {
                if (h->size == h->k && h->td <= complete) goto done;
            } else if (complete >= radius) {
                goto done;
            }
            /* Give up early when finishing is predicted to cost more than the budget:
             * radius search knows its last round up front; k-NN bounds it by the current
             * k-th distance once k candidates are in hand, a loose bound during the
             * first (cheap) rounds, so only trusted from substring radius 2 on. */
            if ((!h && s == 0 && i == 0) || (h && s >= 2 && h->size == h->k)) {
                int target = h ? h->td : radius;
                if (cost + cost_to_reach(t, s, i, target) > t->budget) { rc = 0; goto done; }
            }
            const int L = t->len[i];
            if (s > L) continue;
            double occ = ldexp((double)t->n_indexed, -L), probes = binom(L, s);
            /* more buckets than rows: a scan is cheaper whatever the budget says */
            if (probes > (double)t->n_indexed + 64.0 ||
                cost + probes * (t->probe_cost + occ * t->cand_cost) > t->budget) {
                rc = 0;
                goto done;
            }
            const i32 *trows = t->rows + (i64)i * t->n_indexed;
            const u64 limit = 1ULL << L;
            u64 mask = s == 0 ? 0 : (1ULL << s) - 1;
            int more = 1;
            while (more) {
                /* Batches of buckets, with prefetches issued a stage ahead, so the cache
                 * misses on offsets, row lists and codes overlap instead of queueing. */
                u32 keys[PROBE_BATCH];
                i64 los[PROBE_BATCH], his[PROBE_BATCH];
                int nb = 0;
                while (nb < PROBE_BATCH && more) {
                    keys[nb++] = qk[i] ^ (u32)mask;
                    if (s == 0) { more = 0; break; }
                    u64 low = mask & (~mask + 1), ripple = mask + low; /* Gosper's hack */
                    mask = (((ripple ^ mask) >> 2) / low) | ripple;
                    if (mask >= limit) more = 0;
                }
                if (t->nkeys[i] < 0)
                    for (int b = 0; b < nb; ++b) __builtin_prefetch(t->offsets + t->off_base[i] + keys[b]);
                i64 batch = 0;
                for (int b = 0; b < nb; ++b) {
                    bucket(t, i, keys[b], &los[b], &his[b]);
                    __builtin_prefetch(trows + los[b]);
                    batch += his[b] - los[b];
                }
                nprobe += nb;
                ncand += batch;
                met[i] += batch;
                cost += nb * t->probe_cost + (double)batch * t->cand_cost;
                for (int b = 0; b < nb; ++b) {
                    i64 lo = los[b], hi = his[b];
                    for (i64 p = lo; p < hi && p < lo + PREFETCH_AHEAD; ++p)
                        __builtin_prefetch(codes + (i64)trows[p] * W);
                }
                for (int b = 0; b < nb; ++b) {
                    i64 lo = los[b], hi = his[b];
                    for (i64 p = lo; p < hi; ++p) {
                        if (p + PREFETCH_AHEAD < hi) __builtin_prefetch(codes + (i64)trows[p + PREFETCH_AHEAD] * W);
                        i64 r = trows[p];
                        const u64 *c = codes + r * W;
                        i32 d = dist_w(q, c, W);
                        if (h) {
                            /* the heap holds (distance, row): indexed rows are sorted by
                             * id, so row order is id order and ids[] (a cache miss) is
                             * only read for the k survivors */
                            if (d > h->td) continue;
                            if (allowed && !allowed[r]) continue;
                            if (!first_meeting(t, qk, c, i, s)) continue;
                            if (h->size < h->k || d < h->td || r < h->ti) heap_offer(h, d, r);
                        } else {
                            if (d > radius) continue;
                            if (allowed && !allowed[r]) continue;
                            if (!first_meeting(t, qk, c, i, s)) continue;
                            if (*cnt >= cap) return -1;
                            oq[*cnt] = qi; od[*cnt] = d; orow[*cnt] = r; (*cnt)++;
                        }
                    }
                }
                if (met[i] == t->n_indexed) goto done; /* every row has been met */
                if (cost > t->budget) { rc = 0; goto done; }
            }
        }
    }
done:
    if (stats) { stats[0] += ncand; stats[1] += nprobe; stats[2] += (rc == 0); }
    return rc;
}

/* Exact k-NN for queries (nq, W) -> out_d, out_i (nq, k).  fallback[q] = 1 marks queries
 * that ran out of budget; their outputs are garbage and the caller scans them.
 * Requires rows [0, n_indexed) to be sorted by id (the store keeps them so). */
int fh_mih_knn(const mih_t *t, const u64 *queries, i64 nq, int k, i32 fill_d, i32 *out_d,
               i64 *out_i, u8 *fallback, i64 *stats) {
    if (t->m > MAXM) return -2;
    if (k <= 0) return 0;
    const int W = t->W;
    const i64 *ids = t->ids;
    const u8 *allowed = t->allowed;
    const int has_delta = t->n_total > t->n_indexed;
    i32 *dd = NULL, *md = NULL;
    i64 *di = NULL, *mi = NULL;
    if (has_delta) {
        dd = malloc(sizeof(i32) * k); di = malloc(sizeof(i64) * k);
        md = malloc(sizeof(i32) * k); mi = malloc(sizeof(i64) * k);
        if (!dd || !di || !md || !mi) { free(dd); free(di); free(md); free(mi); return -1; }
    }
    for (i64 q = 0; q < nq; ++q) {
        const u64 *qv = queries + q * W;
        i32 *od = out_d + q * k;
        i64 *oi = out_i + q * k;
        heap_t h;
        heap_init(&h, has_delta ? md : od, has_delta ? mi : oi, k);
        int rc = mih_query(t, qv, &h, 0, (i32)q, NULL, NULL, NULL, NULL, 0, stats);
        fallback[q] = rc == 0;
        if (rc != 1) continue;
        heap_finish(&h, fill_d);
        for (int j = 0; j < h.size; ++j) h.i[j] = ids[h.i[j]]; /* rows -> ids */
        if (!has_delta) continue;
        /* rows added since the build: scan them, then merge the two sorted lists */
        heap_t g;
        heap_init(&g, dd, di, k);
        for (i64 r = t->n_indexed; r < t->n_total; ++r) {
            i32 d = dist_w(qv, t->codes + r * W, W);
            if (d <= g.td) ADMIT(&g, d, r);
        }
        heap_finish(&g, fill_d);
        int a = 0, b = 0;
        for (int j = 0; j < k; ++j) {
            int take_a = b >= g.size || (a < h.size && !worse(md[a], mi[a], dd[b], di[b]));
            if (a >= h.size && b >= g.size) { od[j] = fill_d; oi[j] = -1; }
            else if (take_a) { od[j] = md[a]; oi[j] = mi[a]; a++; }
            else { od[j] = dd[b]; oi[j] = di[b]; b++; }
        }
    }
    free(dd); free(di); free(md); free(mi);
    return 0;
}

/* Radius search: appends (query, distance, row) triples, unsorted.  Returns how many
 * queries were completed (< nq when the output filled up: call again from there with more
 * room); *out_cnt receives the number of triples. */
i64 fh_mih_radius(const mih_t *t, const u64 *queries, i64 nq, int radius, i32 *out_q,
                  i32 *out_d, i64 *out_row, i64 cap, i64 *out_cnt, u8 *fallback, i64 *stats) {
    if (t->m > MAXM) return -2;
    i64 cnt = 0;
    for (i64 q = 0; q < nq; ++q) {
        i64 start = cnt;
        int rc = mih_query(t, queries + q * t->W, NULL, radius, (i32)q, out_q, out_d, out_row,
                           &cnt, cap, stats);
        if (rc == -1) { *out_cnt = start; return q; }
        fallback[q] = rc == 0;
        if (rc == 0) cnt = start;
    }
    *out_cnt = cnt;
    return nq;
}

/* Counting sort of one table: keys (n,) < 2^len -> offsets (2^len + 1), rows (n).
 * counts must be zeroed, (2^len + 1) long; it becomes the offsets. */
void fh_mih_build_direct(const u32 *keys, i64 n, int len, u32 *offsets, i32 *rows) {
    i64 nb = (i64)1 << len;
    for (i64 r = 0; r < n; ++r) offsets[keys[r] + 1]++;
    for (i64 b = 0; b < nb; ++b) offsets[b + 1] += offsets[b];
    /* fill using a moving cursor per bucket, then shift the cursors back into offsets */
    for (i64 r = 0; r < n; ++r) rows[offsets[keys[r]]++] = (i32)r;
    for (i64 b = nb; b > 0; --b) offsets[b] = offsets[b - 1];
    offsets[0] = 0;
}
"""
