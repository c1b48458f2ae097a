/* Compiled twin of the buffer-size path of `mmtrain.packing.search.fill` (`fill_builders.pack_small`).
 *
 * pack_small(keys, counts, starts, capacity, tb_max, tmul) runs, on one sorted key pool, the
 * builders of SMALL_BUILDERS + (_build_largest_fits,) -- the greedy pattern with lookahead, the
 * 16-key small-first min-slack DP (memoised per residual) and the largest-fits greedy -- through
 * the same `packs_with` loop, and returns the packing with fewest packs (ties: earlier builder) as
 * (npacks, [(reps, [(key, start, m), ...]), ...]), exactly what `packs_with` returns.
 *
 * Every step mirrors the Python code line by line (same candidate order, same tie-breaking), so
 * the packings are identical; tests/unit/packing/test_fastpack.py checks that on random inputs and on the
 * bench tables. Keys are handled by index into the sorted key array; "alive" keys (count > 0)
 * are found with two union-find "nearest alive neighbour" structures, which visits the same
 * alive keys, in the same order, as the Python list of alive keys.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int64_t i64;
typedef Py_ssize_t idx_t;
#define BIG (((i64)1) << 62)
#define DP_MAXK 16

typedef struct {
    idx_t n;
    i64 tm, cap, tbmax;
    const i64 *K, *cnt0, *ptr0;
    i64 *L, *T, *cnt, *ptr, *used;
    idx_t *pp; /* prev-alive parents, slot i+1 for key i, slot 0 = sentinel (-1) */
    idx_t *np; /* next-alive parents, slot i for key i, slot n = sentinel */
    idx_t nalive, hi;
    idx_t *touched, *pat;
    idx_t ntouched;
    char *intouch;
    /* DP memo: per residual r, an (offset, len) into memo_k/memo_m; len -1 = absent */
    idx_t *memo_off, *memo_len;
    idx_t *memo_k;
    i64 *memo_m;
    idx_t memo_n, memo_cap;
    /* DP scratch */
    uint64_t *masks;
    idx_t masks_cap;
    /* packing being built: patterns (reps, first entry, n entries) and entries (key idx, start, m) */
    i64 *pat_reps;
    idx_t *pat_first, *pat_n;
    idx_t npat, pat_cap;
    idx_t *ent_k;
    i64 *ent_start, *ent_m;
    idx_t nent, ent_cap;
    i64 npacks;
} Pool;

static int grow(void **p, idx_t *cap, idx_t need, size_t elem) {
    if (need <= *cap) return 0;
    idx_t nc = *cap ? *cap : 64;
    while (nc < need) nc *= 2;
    void *q = realloc(*p, (size_t)nc * elem);
    if (!q) return -1;
    *p = q;
    *cap = nc;
    return 0;
}

static idx_t find_prev(Pool *P, idx_t i) { /* largest alive index <= i, or -1 */
    idx_t x = i + 1, r = x;
    while (P->pp[r] != r) r = P->pp[r];
    while (P->pp[x] != r) { idx_t nx = P->pp[x]; P->pp[x] = r; x = nx; }
    return r - 1;
}

static idx_t find_next(Pool *P, idx_t i) { /* smallest alive index >= i, or n */
    idx_t x = i, r = x;
    while (P->np[r] != r) r = P->np[r];
    while (P->np[x] != r) { idx_t nx = P->np[x]; P->np[x] = r; x = nx; }
    return r;
}

static void reset_pool(Pool *P) {
    idx_t n = P->n;
    memcpy(P->cnt, P->cnt0, (size_t)n * sizeof(i64));
    memcpy(P->ptr, P->ptr0, (size_t)n * sizeof(i64));
    memset(P->used, 0, (size_t)n * sizeof(i64));
    memset(P->intouch, 0, (size_t)n);
    P->ntouched = 0;
    P->nalive = 0;
    P->pp[0] = 0;
    for (idx_t i = 0; i < n; i++) {
        int alive = P->cnt[i] > 0;
        P->pp[i + 1] = alive ? i + 1 : i;
        P->np[i] = alive ? i : i + 1;
        P->nalive += alive;
    }
    P->np[n] = n;
    P->hi = find_prev(P, n - 1);
    for (i64 r = 0; r <= P->cap; r++) P->memo_len[r] = -1;
    P->memo_n = 0;
    P->npat = 0;
    P->nent = 0;
    P->npacks = 0;
}

static inline void add_used(Pool *P, idx_t k, i64 m) {
    if (!P->intouch[k]) { P->intouch[k] = 1; P->touched[P->ntouched++] = k; }
    P->used[k] += m;
}

static void reset_used(Pool *P) {
    for (idx_t j = 0; j < P->ntouched; j++) { P->used[P->touched[j]] = 0; P->intouch[P->touched[j]] = 0; }
    P->ntouched = 0;
}

/* index of the last key <= thr (bisect_right - 1) */
static idx_t upto_index(Pool *P, i64 thr) {
    idx_t lo = 0, hi = P->n;
    while (lo < hi) { idx_t mid = (lo + hi) >> 1; if (P->K[mid] <= thr) lo = mid + 1; else hi = mid; }
    return lo - 1;
}

/* largest_upto(r, tb, below=..., used=used); lim = highest index allowed */
static idx_t largest_upto(Pool *P, i64 r, i64 tb, idx_t lim) {
    if (r < 0) return -1;
    idx_t i = upto_index(P, r * P->tm + P->tm - 1);
    if (i > lim) i = lim;
    if (i < 0) return -1;
    i = find_prev(P, i);
    while (i >= 0) {
        if (P->T[i] <= tb && P->cnt[i] > P->used[i]) return i;
        if (i == 0) return -1;
        i = find_prev(P, i - 1);
    }
    return -1;
}

static i64 vmin_of(Pool *P) {
    idx_t i = find_next(P, 0);
    while (i < P->n) {
        if (P->cnt[i] > P->used[i]) return P->L[i];
        i = find_next(P, i + 1);
    }
    return BIG;
}

/* _best_pair: returns the residual, keys in out[0..*nout) */
static i64 best_pair(Pool *P, i64 r, i64 tb, i64 vmin, int tries, idx_t *out, int *nout) {
    i64 best_res = r;
    *nout = 0;
    idx_t last = P->n - 1;
    idx_t a = largest_upto(P, r, tb, last);
    if (a >= 0) {
        best_res = r - P->L[a];
        out[0] = a;
        *nout = 1;
        if (best_res == 0) return 0;
    }
    a = largest_upto(P, r - vmin, tb, last);
    while (a >= 0 && tries > 0 && 2 * P->L[a] > r - best_res) {
        tries--;
        i64 la = P->L[a];
        P->used[a] += 1;
        idx_t b = largest_upto(P, (r - la < la ? r - la : la), tb - P->T[a], a);
        P->used[a] -= 1;
        if (b >= 0) {
            i64 res = r - la - P->L[b];
            if (res < best_res) {
                best_res = res;
                out[0] = a;
                out[1] = b;
                *nout = 2;
                if (res == 0) break;
            }
        }
        a = largest_upto(P, la, tb, a - 1);
    }
    return best_res;
}

static void add_keys(Pool *P, const idx_t *ks, int nk) {
    for (int j = 0; j < nk; j++) add_used(P, ks[j], 1);
}

static void build_greedy(Pool *P) {
    reset_used(P);
    idx_t top = P->hi;
    add_used(P, top, 1);
    i64 r = P->cap - P->L[top], tb = P->tbmax - P->T[top];
    idx_t keys[3], keys2[2];
    int nk, nk2;
    for (;;) {
        i64 vmin = vmin_of(P);
        if (r < vmin) return;
        if (r < 3 * vmin) {
            best_pair(P, r, tb, vmin, 48, keys, &nk);
            add_keys(P, keys, nk);
            return;
        }
        i64 res2 = best_pair(P, r, tb, vmin, 8, keys2, &nk2);
        if (res2 == 0) { add_keys(P, keys2, nk2); return; }
        idx_t x = largest_upto(P, r - vmin, tb, P->n - 1);
        if (x < 0) {
            best_pair(P, r, tb, vmin, 48, keys, &nk);
            add_keys(P, keys, nk);
            return;
        }
        if (r - P->L[x] >= 3 * vmin) {
            add_used(P, x, 1);
            r -= P->L[x];
            tb -= P->T[x];
            continue;
        }
        i64 best_res = res2;
        idx_t best[3];
        int nbest = nk2;
        for (int j = 0; j < nk2; j++) best[j] = keys2[j];
        idx_t cand = x;
        for (int it = 0; it < 8; it++) {
            if (cand < 0) break;
            i64 lc = P->L[cand];
            add_used(P, cand, 1);
            i64 res = best_pair(P, r - lc, tb - P->T[cand], vmin, 48, keys, &nk);
            P->used[cand] -= 1;
            if (res < best_res) {
                best_res = res;
                best[0] = cand;
                for (int j = 0; j < nk; j++) best[1 + j] = keys[j];
                nbest = 1 + nk;
                if (res == 0) break;
            }
            cand = largest_upto(P, lc, tb, cand - 1);
        }
        add_keys(P, best, nbest);
        return;
    }
}

static void build_largest_fits(Pool *P) {
    reset_used(P);
    idx_t top = P->hi;
    add_used(P, top, 1);
    i64 r = P->cap - P->L[top], tb = P->tbmax - P->T[top];
    for (;;) {
        idx_t k = largest_upto(P, r, tb, P->n - 1);
        if (k < 0) return;
        add_used(P, k, 1);
        r -= P->L[k];
        tb -= P->T[k];
    }
}

static int tiles_over(Pool *P) {
    if (P->tbmax >= BIG) return 0;
    i64 s = 0;
    for (idx_t j = 0; j < P->ntouched; j++) { idx_t k = P->touched[j]; s += P->T[k] * P->used[k]; }
    return s > P->tbmax;
}

/* _build_dp_pattern(maxk=16, prefer_small=True); returns -1 on allocation failure */
static int build_dp_small(Pool *P) {
    reset_used(P);
    idx_t top = P->hi;
    add_used(P, top, 1);
    i64 r = P->cap - P->L[top];
    if (P->memo_len[r] >= 0) {
        idx_t off = P->memo_off[r], ln = P->memo_len[r];
        int ok = 1;
        for (idx_t j = 0; j < ln && ok; j++) {
            idx_t k = P->memo_k[off + j];
            if (P->cnt[k] - (k == top) < P->memo_m[off + j]) ok = 0;
        }
        if (ok) {
            for (idx_t j = 0; j < ln; j++) add_used(P, P->memo_k[off + j], P->memo_m[off + j]);
            if (tiles_over(P)) build_greedy(P);
            return 0;
        }
    }
    /* candidate keys: alive, length <= r; if more than 16, the lowest 4 and the highest 12 */
    idx_t cand[DP_MAXK];
    int nc = 0;
    idx_t hi_i = upto_index(P, r * P->tm + P->tm - 1);
    if (hi_i >= 0) {
        idx_t lowbuf[DP_MAXK + 1];
        int nl = 0;
        idx_t i = find_next(P, 0);
        while (i <= hi_i && nl <= DP_MAXK) { lowbuf[nl++] = i; i = find_next(P, i + 1); }
        if (nl <= DP_MAXK) {
            for (int j = 0; j < nl; j++) cand[nc++] = lowbuf[j];
        } else {
            for (int j = 0; j < DP_MAXK / 4; j++) cand[nc++] = lowbuf[j];
            idx_t top12[DP_MAXK];
            int nt = 0, want = DP_MAXK - DP_MAXK / 4;
            i = find_prev(P, hi_i);
            while (i >= 0 && nt < want) { top12[nt++] = i; i = i ? find_prev(P, i - 1) : -1; }
            for (int j = nt - 1; j >= 0; j--) cand[nc++] = top12[j];
        }
    }
    idx_t W = (idx_t)(r / 64 + 1);
    int lastbits = (int)(r % 64) + 1;
    uint64_t lastmask = lastbits == 64 ? ~(uint64_t)0 : (((uint64_t)1 << lastbits) - 1);
    idx_t it_k[DP_MAXK * 64];
    i64 it_t[DP_MAXK * 64], it_w[DP_MAXK * 64];
    idx_t nit = 0;
    /* masks[j] = reach after item j; masks[-1] = {0} stored at slot 0, item j at slot j+1 */
    if (grow((void **)&P->masks, &P->masks_cap, W, sizeof(uint64_t)) < 0) return -1;
    memset(P->masks, 0, (size_t)W * sizeof(uint64_t));
    P->masks[0] = 1;
    for (int c = 0; c < nc; c++) {
        idx_t k = cand[c];
        i64 ln = P->L[k];
        i64 avail = P->cnt[k] - P->used[k];
        i64 nmax = ln ? (avail < r / ln ? avail : r / ln) : avail;
        i64 m = 1;
        while (nmax > 0) {
            i64 t = m < nmax ? m : nmax;
            i64 w = ln * t;
            if (grow((void **)&P->masks, &P->masks_cap, (nit + 2) * W, sizeof(uint64_t)) < 0) return -1;
            const uint64_t *src = P->masks + nit * W;
            uint64_t *dst = P->masks + (nit + 1) * W;
            idx_t ws = (idx_t)(w / 64);
            int bs = (int)(w % 64);
            for (idx_t j = 0; j < W; j++) {
                uint64_t v = src[j];
                idx_t s = j - ws;
                if (s >= 0) {
                    v |= src[s] << bs;
                    if (bs && s - 1 >= 0) v |= src[s - 1] >> (64 - bs);
                }
                dst[j] = v;
            }
            dst[W - 1] &= lastmask;
            it_k[nit] = k;
            it_t[nit] = t;
            it_w[nit] = w;
            nit++;
            nmax -= t;
            m *= 2;
        }
    }
    const uint64_t *reach = P->masks + nit * W;
    i64 tgt = 0;
    for (idx_t j = W - 1; j >= 0; j--) {
        if (reach[j]) { tgt = (i64)j * 64 + 63 - __builtin_clzll(reach[j]); break; }
    }
    /* backtrack, smallest keys first: take item idx only if the earlier ones cannot reach tgt */
    idx_t sub_k[DP_MAXK];
    i64 sub_m[DP_MAXK];
    int ns = 0;
    for (idx_t idx = nit - 1; idx >= 0; idx--) {
        const uint64_t *prev = P->masks + idx * W;
        int has = (int)((prev[tgt / 64] >> (tgt % 64)) & 1);
        if (!has) {
            idx_t k = it_k[idx];
            int j = 0;
            while (j < ns && sub_k[j] != k) j++;
            if (j == ns) { sub_k[ns] = k; sub_m[ns] = 0; ns++; }
            sub_m[j] += it_t[idx];
            tgt -= it_w[idx];
        }
    }
    idx_t oldmc = P->memo_cap;
    if (grow((void **)&P->memo_k, &P->memo_cap, P->memo_n + ns + 1, sizeof(idx_t)) < 0) return -1;
    if (P->memo_cap != oldmc) {
        void *q = realloc(P->memo_m, (size_t)P->memo_cap * sizeof(i64));
        if (!q) return -1;
        P->memo_m = q;
    }
    P->memo_off[r] = P->memo_n;
    P->memo_len[r] = ns;
    for (int j = 0; j < ns; j++) { P->memo_k[P->memo_n + j] = sub_k[j]; P->memo_m[P->memo_n + j] = sub_m[j]; }
    P->memo_n += ns;
    for (int j = 0; j < ns; j++) add_used(P, sub_k[j], sub_m[j]);
    if (tiles_over(P)) build_greedy(P);
    return 0;
}

static int cmp_desc(const void *a, const void *b) {
    idx_t x = *(const idx_t *)a, y = *(const idx_t *)b;
    return (x < y) - (x > y);
}

static void consume(Pool *P, idx_t k, i64 q) {
    P->ptr[k] += q;
    P->cnt[k] -= q;
    if (P->cnt[k] == 0) {
        P->pp[k + 1] = k;
        P->np[k] = k + 1;
        P->nalive--;
        if (k == P->hi) P->hi = P->nalive ? find_prev(P, k) : -1;
    }
}

/* packs_with(builder): 0 ok, -1 allocation failure */
static int packs_with(Pool *P, int builder) {
    while (P->nalive > 0) {
        if (builder == 0) build_greedy(P);
        else if (builder == 1) { if (build_dp_small(P) < 0) return -1; }
        else build_largest_fits(P);
        /* the pattern: touched keys with used > 0, by key descending */
        idx_t *pat = P->pat;
        idx_t np_ = 0;
        for (idx_t j = 0; j < P->ntouched; j++) {
            idx_t k = P->touched[j];
            if (P->used[k] > 0) pat[np_++] = k;
        }
        qsort(pat, (size_t)np_, sizeof(idx_t), cmp_desc);
        i64 reps = -1;
        for (idx_t j = 0; j < np_; j++) {
            i64 q = P->cnt[pat[j]] / P->used[pat[j]];
            if (reps < 0 || q < reps) reps = q;
        }
        idx_t oldec = P->ent_cap;
        if (grow((void **)&P->ent_k, &P->ent_cap, P->nent + np_ + 1, sizeof(idx_t)) < 0) return -1;
        if (P->ent_cap != oldec) {
            void *q1 = realloc(P->ent_start, (size_t)P->ent_cap * sizeof(i64));
            if (!q1) return -1;
            P->ent_start = q1;
            void *q2 = realloc(P->ent_m, (size_t)P->ent_cap * sizeof(i64));
            if (!q2) return -1;
            P->ent_m = q2;
        }
        idx_t oldcap = P->pat_cap;
        if (grow((void **)&P->pat_reps, &P->pat_cap, P->npat + 1, sizeof(i64)) < 0) return -1;
        if (P->pat_cap != oldcap || !P->pat_first) {
            void *q1 = realloc(P->pat_first, (size_t)P->pat_cap * sizeof(idx_t));
            if (!q1) return -1;
            P->pat_first = q1;
            void *q2 = realloc(P->pat_n, (size_t)P->pat_cap * sizeof(idx_t));
            if (!q2) return -1;
            P->pat_n = q2;
        }
        P->pat_reps[P->npat] = reps;
        P->pat_first[P->npat] = P->nent;
        P->pat_n[P->npat] = np_;
        P->npat++;
        for (idx_t j = 0; j < np_; j++) {
            idx_t k = pat[j];
            i64 m = P->used[k];
            P->ent_k[P->nent] = k;
            P->ent_start[P->nent] = P->ptr[k];
            P->ent_m[P->nent] = m;
            P->nent++;
            consume(P, k, reps * m);
        }
        P->npacks += reps;
        reset_used(P);
    }
    return 0;
}

static void free_pool(Pool *P) {
    free(P->L); free(P->T); free(P->cnt); free(P->ptr); free(P->used);
    free(P->pp); free(P->np); free(P->touched); free(P->pat); free(P->intouch);
    free(P->memo_off); free(P->memo_len); free(P->memo_k); free(P->memo_m); free(P->masks);
    free(P->pat_reps); free(P->pat_first); free(P->pat_n);
    free(P->ent_k); free(P->ent_start); free(P->ent_m);
    free((void *)P->K); free((void *)P->cnt0); free((void *)P->ptr0);
}

static i64 *to_i64_array(PyObject *seq, idx_t n, const char *what) {
    PyObject *fast = PySequence_Fast(seq, what);
    if (!fast) return NULL;
    if (PySequence_Fast_GET_SIZE(fast) != n) {
        Py_DECREF(fast);
        PyErr_Format(PyExc_ValueError, "%s: expected %zd items", what, n);
        return NULL;
    }
    i64 *a = malloc((size_t)(n ? n : 1) * sizeof(i64));
    if (!a) { Py_DECREF(fast); PyErr_NoMemory(); return NULL; }
    PyObject **items = PySequence_Fast_ITEMS(fast);
    for (idx_t i = 0; i < n; i++) {
        a[i] = PyLong_AsLongLong(items[i]);
        if (a[i] == -1 && PyErr_Occurred()) { free(a); Py_DECREF(fast); return NULL; }
    }
    Py_DECREF(fast);
    return a;
}

static PyObject *py_pack_small(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *okeys, *ocnt, *optr;
    long long cap, tbmax, tm;
    if (!PyArg_ParseTuple(args, "OOOLLL", &okeys, &ocnt, &optr, &cap, &tbmax, &tm)) return NULL;
    idx_t n = PySequence_Size(okeys);
    if (n < 0) return NULL;
    if (n == 0) return Py_BuildValue("(i[])", 0);
    if (cap < 0 || cap > (1 << 24) || tm < 1 || tm > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "pack_small: capacity or tile multiplier out of range");
        return NULL;
    }
    Pool P;
    memset(&P, 0, sizeof(P));
    P.n = n; P.tm = tm; P.cap = cap; P.tbmax = tbmax;
    P.K = to_i64_array(okeys, n, "keys");
    if (P.K) P.cnt0 = to_i64_array(ocnt, n, "counts");
    if (P.cnt0) P.ptr0 = to_i64_array(optr, n, "starts");
    if (!P.ptr0) { free_pool(&P); return NULL; }
    for (idx_t i = 0; i < n; i++) {
        if (P.K[i] < 0 || P.K[i] / tm > cap || P.cnt0[i] < 0 || (i && P.K[i] <= P.K[i - 1])) {
            free_pool(&P);
            PyErr_SetString(PyExc_ValueError, "pack_small: keys must be sorted, distinct, non-negative, lengths <= capacity");
            return NULL;
        }
    }
    size_t sz = (size_t)n;
    P.L = malloc(sz * sizeof(i64)); P.T = malloc(sz * sizeof(i64));
    P.cnt = malloc(sz * sizeof(i64)); P.ptr = malloc(sz * sizeof(i64)); P.used = malloc(sz * sizeof(i64));
    P.pp = malloc((sz + 2) * sizeof(idx_t)); P.np = malloc((sz + 2) * sizeof(idx_t));
    P.touched = malloc(sz * sizeof(idx_t)); P.pat = malloc(sz * sizeof(idx_t)); P.intouch = malloc(sz);
    P.memo_off = malloc(((size_t)cap + 1) * sizeof(idx_t)); P.memo_len = malloc(((size_t)cap + 1) * sizeof(idx_t));
    if (!P.L || !P.T || !P.cnt || !P.ptr || !P.used || !P.pp || !P.np || !P.touched || !P.pat || !P.intouch || !P.memo_off || !P.memo_len) {
        free_pool(&P);
        return PyErr_NoMemory();
    }
    for (idx_t i = 0; i < n; i++) { P.L[i] = P.K[i] / tm; P.T[i] = P.K[i] % tm; }

    /* run the builders; keep the best packing's arrays */
    i64 best_np = -1;
    i64 *b_reps = NULL, *b_start = NULL, *b_m = NULL;
    idx_t *b_first = NULL, *b_n = NULL, *b_k = NULL;
    idx_t b_npat = 0;
    int failed = 0;
    for (int builder = 0; builder < 3 && !failed; builder++) {
        reset_pool(&P);
        if (packs_with(&P, builder) < 0) { failed = 1; break; }
        if (best_np < 0 || P.npacks < best_np) {
            best_np = P.npacks;
            free(b_reps); free(b_start); free(b_m); free(b_first); free(b_n); free(b_k);
            b_npat = P.npat;
            b_reps = malloc((size_t)(P.npat + 1) * sizeof(i64));
            b_first = malloc((size_t)(P.npat + 1) * sizeof(idx_t));
            b_n = malloc((size_t)(P.npat + 1) * sizeof(idx_t));
            b_k = malloc((size_t)(P.nent + 1) * sizeof(idx_t));
            b_start = malloc((size_t)(P.nent + 1) * sizeof(i64));
            b_m = malloc((size_t)(P.nent + 1) * sizeof(i64));
            if (!b_reps || !b_first || !b_n || !b_k || !b_start || !b_m) { failed = 1; break; }
            memcpy(b_reps, P.pat_reps, (size_t)P.npat * sizeof(i64));
            memcpy(b_first, P.pat_first, (size_t)P.npat * sizeof(idx_t));
            memcpy(b_n, P.pat_n, (size_t)P.npat * sizeof(idx_t));
            memcpy(b_k, P.ent_k, (size_t)P.nent * sizeof(idx_t));
            memcpy(b_start, P.ent_start, (size_t)P.nent * sizeof(i64));
            memcpy(b_m, P.ent_m, (size_t)P.nent * sizeof(i64));
        }
    }
    PyObject *result = NULL;
    if (failed) {
        PyErr_NoMemory();
    } else {
        PyObject *packing = PyList_New(b_npat);
        for (idx_t p = 0; packing && p < b_npat; p++) {
            PyObject *cols = PyList_New(b_n[p]);
            if (!cols) { Py_CLEAR(packing); break; }
            for (idx_t j = 0; j < b_n[p]; j++) {
                idx_t e = b_first[p] + j;
                PyObject *t = Py_BuildValue("(LLL)", (long long)P.K[b_k[e]], (long long)b_start[e], (long long)b_m[e]);
                if (!t) { Py_DECREF(cols); cols = NULL; break; }
                PyList_SET_ITEM(cols, j, t);
            }
            if (!cols) { Py_CLEAR(packing); break; }
            PyObject *entry = Py_BuildValue("(LN)", (long long)b_reps[p], cols);
            if (!entry) { Py_CLEAR(packing); break; }
            PyList_SET_ITEM(packing, p, entry);
        }
        if (packing) result = Py_BuildValue("(LN)", (long long)best_np, packing);
    }
    free(b_reps); free(b_start); free(b_m); free(b_first); free(b_n); free(b_k);
    free_pool(&P);
    return result;
}

static PyMethodDef methods[] = {
    {"pack_small", py_pack_small, METH_VARARGS,
     "pack_small(keys, counts, starts, capacity, tb_max, tmul) -> (npacks, packing): best of the "
     "buffer builders of fill_builders, identical to the pure-Python packing."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_fastpack", NULL, -1, methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__fastpack(void) { return PyModule_Create(&moddef); }
