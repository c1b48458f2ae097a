"""Local-search repair of finished plans (pure Python, runs after `fill`, so the C and Python
paths of `fill` stay byte-identical).

- `top_up` (buffered mode with carry): the emitted packs of a buffer take items from the samples
  held back for the next buffer, by exchanges that strictly raise the pack's tokens (<= 2 pack
  items out, 1-2 held items in). The held samples are re-packed from scratch in the next buffer
  anyway, so only which samples are held matters: every exchange moves tokens into emitted packs.
- `repair_packs` (offline): pool the items of the k least-full packs (k = 1..max_k), push pool
  items into the slack of the other packs by the same kind of exchanges, and keep the result only
  when the pool then fits into k-1 packs (a strict pack-count reduction).

Both are deterministic (fixed orders, total tie-breaking on item ids) and bounded by `work`
(an operation count, not a clock).
"""

import bisect

_NO_TILE_LIMIT = 1 << 62


def _subsets2(items, lens, tls):
    """(sum, tiles, items) for the subsets of size 0..2 of `items`."""
    out = [(0, 0, ())]
    n = len(items)
    for a in range(n):
        ia = items[a]
        out.append((lens[ia], tls[ia], (ia,)))
        for b in range(a + 1, n):
            ib = items[b]
            out.append((lens[ia] + lens[ib], tls[ia] + tls[ib], (ia, ib)))
    return out


def _sorted_sums(items, lens, tls, pairs: bool):
    """(sum, tiles, items) of every single item and, if `pairs`, every pair, sorted; plus the sums."""
    ps = [(lens[a], tls[a], (a,)) for a in items]
    if pairs:
        for x in range(len(items)):
            a = items[x]
            for y in range(x + 1, len(items)):
                b = items[y]
                ps.append((lens[a] + lens[b], tls[a] + tls[b], (a, b)))
    ps.sort()
    return ps, [t[0] for t in ps]


def _fits_bins(items, m, lens, tls, cap, tmax, budget=2000):
    """Pack `items` into at most m bins (FFD, then a bounded exact DFS). Returns bins or None."""
    if not items:
        return []
    if m <= 0:
        return None
    if sum(lens[i] for i in items) > m * cap or sum(tls[i] for i in items) > m * tmax:
        return None
    order = sorted(items, key=lambda i: (-lens[i], -tls[i], i))
    bins, rr, rt = [], [], []
    for i in order:
        for b in range(len(bins)):
            if rr[b] >= lens[i] and rt[b] >= tls[i]:
                bins[b].append(i); rr[b] -= lens[i]; rt[b] -= tls[i]
                break
        else:
            if len(bins) == m:
                bins = None
                break
            bins.append([i]); rr.append(cap - lens[i]); rt.append(tmax - tls[i])
    if bins is not None:
        return bins
    # bounded exact DFS: place items (largest first) into bins, skipping bins with equal state
    bins = [[] for _ in range(m)]
    rr = [cap] * m
    rt = [tmax] * m
    nodes = [budget]

    def dfs(pos):
        if pos == len(order):
            return True
        nodes[0] -= 1
        if nodes[0] < 0:
            return False
        i = order[pos]
        li, ti = lens[i], tls[i]
        seen = set()
        for b in range(m):
            st = (rr[b], rt[b])
            if st in seen or rr[b] < li or rt[b] < ti:
                continue
            seen.add(st)
            rr[b] -= li; rt[b] -= ti; bins[b].append(i)
            if dfs(pos + 1):
                return True
            rr[b] += li; rt[b] += ti; bins[b].pop()
            if not bins[b]:
                break  # the item opened an empty bin and failed: other empty bins are equal
        return False

    return [b for b in bins if b] if dfs(0) else None


def repair_packs(packs, lens, cap, tls=None, tmax=None, max_k=6, work=200_000):
    """Local-search repair: pool the items of the k least-full packs (k = 1..max_k) and try to
    fit them into k-1 packs, first pushing pool items into the slack of the other packs by
    exchanges (<= 2 pack items out, 1-2 pool items in, pool volume strictly decreasing).
    Only strict pack-count reductions are kept. Deterministic; `work` bounds the operations."""
    n_packs = len(packs)
    if n_packs < 2:
        return packs
    if tls is None:
        tls = [0] * len(lens)
    if tmax is None:
        tmax = _NO_TILE_LIMIT
    packs = [list(p) for p in packs]
    fill = [sum(lens[i] for i in p) for p in packs]
    tfill = [sum(tls[i] for i in p) for p in packs]
    alive = [True] * n_packs
    budget = work
    improved = True
    while improved and budget > 0:
        improved = False
        order = sorted((j for j in range(len(packs)) if alive[j]), key=lambda j: (fill[j], j))
        for k in range(1, min(max_k, len(order) - 1) + 1):
            pooled = order[:k]
            pool = [i for j in pooled for i in packs[j]]
            pv = sum(lens[i] for i in pool)
            # targets: other packs with room, most room first
            targets = [j for j in order[k:] if fill[j] < cap]
            targets.sort(key=lambda j: (fill[j], j))
            if pv > (k - 1) * cap + sum(cap - fill[j] for j in targets):
                continue  # not enough slack anywhere
            saved = {j: (list(packs[j]), fill[j], tfill[j]) for j in targets}
            subs = {}
            ok = False
            changed = True
            if pv <= (k - 1) * cap:
                bins = _fits_bins(pool, k - 1, lens, tls, cap, tmax)
                ok = bins is not None

            ps, psum = _sorted_sums(pool, lens, tls, pairs=True)
            budget -= len(ps)
            while changed and budget > 0 and not ok:
                changed = False
                for j in targets:
                    if budget <= 0:
                        break
                    s = cap - fill[j]
                    if s <= 0 or not ps:
                        continue
                    sj = subs.get(j)
                    if sj is None:
                        sj = subs[j] = _subsets2(packs[j], lens, tls)
                    best = None
                    tj = tmax - tfill[j]
                    p0 = psum[0]
                    for sa, ta, A in sj:
                        budget -= 1
                        if p0 > sa + s:
                            continue
                        hi = bisect.bisect_right(psum, sa + s) - 1
                        while hi >= 0 and psum[hi] > sa:
                            sp, tp, P = ps[hi]
                            if tp - ta <= tj:
                                if best is None or sp - sa > best[0]:
                                    best = (sp - sa, A, P, tp - ta)
                                break
                            hi -= 1
                            budget -= 1
                        if best is not None and best[0] == s:
                            break
                    if best is None:
                        continue
                    moved, A, P, dt = best
                    pk = packs[j]
                    for a in A:
                        pk.remove(a)
                    pk.extend(P)
                    fill[j] += moved
                    tfill[j] += dt
                    for p in P:
                        pool.remove(p)
                    pool.extend(A)
                    pv -= moved
                    subs.pop(j, None)
                    changed = True
                    if pv <= (k - 1) * cap:
                        bins = _fits_bins(pool, k - 1, lens, tls, cap, tmax)
                        budget -= len(pool) * 4
                        if bins is not None:
                            ok = True
                            break
                    ps, psum = _sorted_sums(pool, lens, tls, pairs=True)
                    budget -= len(ps)
            if ok:
                for j, b in zip(pooled, bins + [None] * (k - len(bins))):
                    if b is None:
                        alive[j] = False
                        packs[j] = []
                    else:
                        packs[j] = b
                        fill[j] = sum(lens[i] for i in b)
                        tfill[j] = sum(tls[i] for i in b)
                improved = True
                break
            for j, (p, f, t) in saved.items():
                packs[j], fill[j], tfill[j] = p, f, t
    return [p for j, p in enumerate(packs) if alive[j]]


def top_up(packs, held, lens, cap, tls=None, tmax=None, movable=None, max_held=None, work=20_000, pair_max=100):
    """Fill the slack of emitted `packs` from the `held` items (those carried to the next buffer):
    per pack (fullest first, ties: later pack first) the exchange of <= 2 pack items (movable ones) for 1-2 held items
    that leaves the least slack; every applied exchange strictly raises that pack's tokens, the
    total held tokens drop by the same amount. Returns (packs, held)."""
    if not packs or not held:
        return packs, held
    if tls is None:
        tls = [0] * len(lens)
    if tmax is None:
        tmax = _NO_TILE_LIMIT
    held = list(held)
    fills = [sum(lens[i] for i in p) for p in packs]
    order = sorted((j for j in range(len(packs)) if fills[j] < cap), key=lambda j: (-fills[j], -j))
    if not order:
        return packs, held
    packs = list(packs)
    budget = work

    with_pairs = len(held) <= pair_max
    ps, psum = _sorted_sums(held, lens, tls, pairs=with_pairs)
    budget -= len(ps)
    big = 1 << 62
    bisect_right = bisect.bisect_right
    for j in order:
        if budget <= 0 or not ps:
            break
        pk = packs[j]
        s = cap - fills[j]
        tj = tmax - sum([tls[i] for i in pk])
        room = big if max_held is None else max_held - len(held)
        items = pk if movable is None else [i for i in pk if movable[i]]
        best = None
        bmove = 0
        p0 = psum[0]
        # subsets A of `items` in _subsets2's order: (), then (a,), (a, b) for b after a
        ni = len(items)
        budget -= 1 + ni * (ni + 1) // 2
        cands = [(0, 0, ())] if s >= p0 else []
        lo = p0 - s  # A is useful only if sum(A) + s >= the smallest held sum
        for x in range(ni):
            a = items[x]
            la_, ta_ = lens[a], tls[a]
            if la_ >= lo:
                cands.append((la_, ta_, (a,)))
            if room >= 1:
                for y in range(x + 1, ni):
                    b = items[y]
                    if la_ + lens[b] >= lo:
                        cands.append((la_ + lens[b], ta_ + tls[b], (a, b)))
        for sa, ta, A in cands:
            la = len(A)
            hi = bisect_right(psum, sa + s) - 1
            while hi >= 0 and psum[hi] > sa:
                sp, tp, P = ps[hi]
                if tp - ta <= tj and la - len(P) <= room:
                    if sp - sa > bmove:
                        best, bmove = (sp - sa, A, P), sp - sa
                    break
                hi -= 1
                budget -= 1
            if bmove == s:
                break
        if best is None:
            continue
        _, A, P = best
        packs[j] = [i for i in pk if i not in A] + list(P)
        held = [i for i in held if i not in P] + list(A)
        pairs = len(held) <= pair_max
        if pairs != with_pairs:
            ps, psum = _sorted_sums(held, lens, tls, pairs=pairs)  # crossed pair_max: rebuild
            with_pairs = pairs
            budget -= len(ps)
            continue
        # incremental update of the sorted (sum, tiles, items) list: same content as _sorted_sums()
        if not pairs:
            for i in P:
                x = bisect.bisect_left(ps, (lens[i], tls[i], (i,)))
                del ps[x]
                del psum[x]
            for a in A:
                t = (lens[a], tls[a], (a,))
                x = bisect.bisect_left(ps, t)
                ps.insert(x, t)
                psum.insert(x, t[0])
            budget -= 4
            continue
        gone = set(P)
        ps = [t for t in ps if gone.isdisjoint(t[2])]
        new = [(lens[a], tls[a], (a,)) for a in A]
        base = len(held) - len(A)
        for y in range(base, len(held)):
            b = held[y]
            for x in range(y):
                a = held[x]
                new.append((lens[a] + lens[b], tls[a] + tls[b], (a, b)))
        ps += new
        ps.sort()
        psum = [t[0] for t in ps]
        budget -= len(ps) // 8 + len(new)
    return packs, held
