"""Retrieval metrics (CMC, mAP in two conventions, mINP) and k-reciprocal re-ranking. numpy only:
importable without torch."""

import numpy as np

from .errors import EvaluationInputError


def as_numpy(array):
    """A numpy view of an array-like; torch tensors (on any device) are accepted without importing torch."""
    if hasattr(array, "detach"):
        array = array.detach().cpu().numpy()
    return np.asarray(array)


def check_finite(array, what):
    """`array` as numpy; NaN or inf values are refused with one line (EvaluationInputError): a ranking
    or a rate computed from them would be meaningless."""
    array = as_numpy(array)
    if np.issubdtype(array.dtype, np.number) and not np.isfinite(array).all():
        bad = int(np.size(array) - np.isfinite(array).sum())
        raise EvaluationInputError(f"{what} holds {bad} NaN or infinite value(s) of {np.size(array)}; the features "
                                   f"or scores are broken (a diverged model, a damaged result file)")
    return array


_COUNTING_MAX_MATCHES = 2  # above this many true matches per query, sorting rows is cheaper than counting


def _count_sorted_below(ascending, rows, values, inclusive):
    """For every pair (rows[p], values[p]): how many entries of the ascending row are < value
    (<= value when inclusive). A binary search run for all pairs at once (log2(G) numpy steps)."""
    num_g = ascending.shape[1]
    lo = np.zeros(len(rows), dtype=np.int64)
    hi = np.full(len(rows), num_g, dtype=np.int64)
    active = lo < hi
    while active.any():
        mid = (lo + hi) // 2
        at_mid = ascending[rows, np.minimum(mid, num_g - 1)]
        go_right = active & ((at_mid <= values) if inclusive else (at_mid < values))
        lo = np.where(go_right, mid + 1, lo)
        hi = np.where(active & ~go_right, mid, hi)
        active = lo < hi
    return lo


def _match_ranks(scores, matches, method="auto"):
    """0-based ranks of the true matches in each query's ranked list (descending score, ties by
    gallery order). Returns (query_index, rank) arrays sorted by query, then rank.
    method "count": one pass over the matrix per match slot (the m-th match of every query at once),
    fastest with one or two matches per query (the hand protocol); "bisect": sort every row once,
    then binary-search all matches together; "auto" picks by the largest number of matches."""
    num_q, num_g = scores.shape
    q_idx, g_idx = np.divmod(np.flatnonzero(matches), num_g)
    match_scores = scores[q_idx, g_idx]
    counts = np.bincount(q_idx, minlength=num_q)
    max_matches = int(counts.max()) if len(q_idx) else 0
    if method == "auto":
        method = "count" if max_matches <= _COUNTING_MAX_MATCHES else "bisect"
    if method == "count":
        slot = np.arange(len(q_idx)) - (np.cumsum(counts) - counts)[q_idx]
        higher = np.empty(len(q_idx), dtype=np.int64)
        higher_or_equal = np.empty(len(q_idx), dtype=np.int64)
        for m in range(max_matches):
            in_slot = slot == m
            threshold = np.full((num_q, 1), np.inf, dtype=scores.dtype)
            threshold[q_idx[in_slot], 0] = match_scores[in_slot]
            higher[in_slot] = np.greater(scores, threshold).sum(1, dtype=np.int64)[q_idx[in_slot]]
            higher_or_equal[in_slot] = np.greater_equal(scores, threshold).sum(1, dtype=np.int64)[q_idx[in_slot]]
    elif method == "bisect":
        ascending = np.sort(scores, axis=1)
        higher = num_g - _count_sorted_below(ascending, q_idx, match_scores, inclusive=True)
        higher_or_equal = num_g - _count_sorted_below(ascending, q_idx, match_scores, inclusive=False)
    else:
        raise ValueError(f"unknown ranking method {method!r}; use 'auto', 'count' or 'bisect'")
    ranks = higher
    tied = np.flatnonzero(higher_or_equal - higher > 1)  # another item has exactly the match's score
    if len(tied):
        rows = scores[q_idx[tied]]
        earlier = np.arange(num_g)[None, :] < g_idx[tied][:, None]
        ranks[tied] += np.count_nonzero((rows == match_scores[tied][:, None]) & earlier, axis=1)
    order = np.lexsort((ranks, q_idx))
    return q_idx[order], ranks[order]


def _metrics_from_ranks(q_idx, ranks, num_q, max_rank, convention):
    """CMC, mAP, mINP and per-query AP, INP, first_rank from the sorted match ranks."""
    counts = np.bincount(q_idx, minlength=num_q)
    has_match = counts > 0
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    hit_number = (np.arange(len(q_idx)) - starts[q_idx] + 1).astype(np.float64)  # i = 1..n per query
    precision = hit_number / (ranks + 1)
    if convention == "hand":
        # trapezoid rule: mean of the precision just before and at each hit (1 before rank 0)
        before = np.where(ranks == 0, 1.0, (hit_number - 1) / np.maximum(ranks, 1))
        terms = (before + precision) / 2
    elif convention == "standard":
        terms = precision
    else:
        raise ValueError(f"unknown metric convention {convention!r}; use 'hand' or 'standard'")
    ap = np.bincount(q_idx, weights=terms, minlength=num_q) / np.maximum(counts, 1)
    first_rank = np.full(num_q, -1, dtype=np.int64)
    last_rank = np.full(num_q, -1, dtype=np.int64)
    first_rank[has_match] = ranks[starts[has_match]]
    last_rank[has_match] = ranks[starts[has_match] + counts[has_match] - 1]
    inp = np.where(has_match, counts / np.maximum(last_rank + 1.0, 1.0), 0.0)
    counted = np.ones(num_q, dtype=bool) if convention == "hand" else has_match
    num_counted = int(counted.sum())
    if num_counted == 0:
        raise ValueError("no query has a true match in the gallery; nothing to evaluate")
    hits = first_rank[counted & has_match]
    cmc = np.cumsum(np.bincount(hits[hits < max_rank], minlength=max_rank)[:max_rank]) / num_counted
    return {"cmc": cmc, "mAP": float(ap[counted].sum() / num_counted),
            "mINP": float(inp[counted].sum() / num_counted), "AP": ap, "INP": inp,
            "first_rank": first_rank, "num_queries": num_q, "num_valid": num_counted}


def rank_metrics(scores, q_pids, g_pids, q_camids=None, g_camids=None, max_rank=50,
                 convention="hand", distance=False, method="auto"):
    """Retrieval metrics for a (num_query, num_gallery) score matrix, computed for all queries at
    once (no per-query loop). Higher scores rank first; `distance=True` means lower ranks first.
    Returns cmc (max_rank,), mAP, mINP and per-query AP, INP, first_rank (-1 when no match).
    convention "hand": trapezoid AP, every query counts (no match -> 0), cameras not allowed.
    convention "standard": non-interpolated AP, same pid+camera gallery items removed when cameras
    are given, queries without a match skipped."""
    scores = check_finite(scores, "the score matrix")
    if not np.issubdtype(scores.dtype, np.floating):
        scores = scores.astype(np.float64)
    if distance:
        scores = -scores
    q_pids, g_pids = np.asarray(q_pids).reshape(-1), np.asarray(g_pids).reshape(-1)
    if scores.shape != (len(q_pids), len(g_pids)):
        raise ValueError(f"score matrix shape {scores.shape} does not match {len(q_pids)} query and "
                         f"{len(g_pids)} gallery labels")
    matches = q_pids[:, None] == g_pids[None, :]
    if (q_camids is None) != (g_camids is None):
        raise ValueError("give both q_camids and g_camids, or neither")
    if q_camids is not None:
        if convention == "hand":
            raise ValueError("the 'hand' convention has no camera filtering; use convention='standard'")
        same_cam = np.asarray(q_camids).reshape(-1)[:, None] == np.asarray(g_camids).reshape(-1)[None, :]
        junk = matches & same_cam
        matches = matches & ~junk
        scores = np.where(junk, -np.inf, scores)  # ranked below every real item, never counted
    q_idx, ranks = _match_ranks(scores, matches, method)
    return _metrics_from_ranks(q_idx, ranks, len(q_pids), max_rank, convention)


REPORTED_RANKS = (1, 5, 10, 20)

# Every metric an evaluation reports, in column order: results.json, results.csv, the summary and the
# printed tables all follow this tuple. A new metric is computed in query_gallery_metrics and named here.
METRIC_NAMES = ("rank1", "rank5", "rank10", "rank20", "mAP_hand", "mAP_standard", "mINP")
# Table headings (a metric without one is printed under its own name).
METRIC_LABELS = {"rank1": "Rank-1", "rank5": "Rank-5", "rank10": "Rank-10", "rank20": "Rank-20",
                 "mAP_hand": "mAP", "mAP_standard": "mAP (standard)", "mINP": "mINP"}
# The headline table, as hand-identification papers report it; the other metrics follow in a second one.
PAPER_METRICS = ("rank1", "rank5", "rank10", "mAP_hand")


def query_gallery_metrics(sim, q_labels, g_labels, max_rank=50):
    """Every reported metric for one query/gallery pair (no cameras): Rank-1/5/10/20 and mAP in the
    hand convention, mAP in the standard convention, mINP (all queries; no match counts 0)."""
    sim = check_finite(sim, "the similarity matrix")
    matches = np.asarray(q_labels)[:, None] == np.asarray(g_labels)[None, :]
    q_idx, ranks = _match_ranks(sim, matches)
    length = max(max_rank, max(REPORTED_RANKS))
    hand = _metrics_from_ranks(q_idx, ranks, len(sim), length, "hand")
    out = {f"rank{k}": float(hand["cmc"][k - 1]) for k in REPORTED_RANKS}
    out["mAP_hand"] = hand["mAP"]
    out["mINP"] = hand["mINP"]
    if (hand["first_rank"] >= 0).any():
        out["mAP_standard"] = _metrics_from_ranks(q_idx, ranks, len(sim), length, "standard")["mAP"]
    else:
        out["mAP_standard"] = 0.0
    out["num_query_without_match"] = int((hand["first_rank"] < 0).sum())
    out["cmc"] = hand["cmc"][:max_rank].tolist()
    return out


def re_ranking(qf, gf, k1=20, k2=6, lambda_value=0.3):
    """k-reciprocal re-ranking (Zhong et al., CVPR 2017) of queries `qf` against gallery `gf`.
    Distances are squared euclidean on the features as given. Returns the (num_q, num_g) re-ranked
    distance (lower = closer). Memory is O((num_q + num_g)^2). The neighbour weights V and the
    Jaccard distance are kept in float16 as in the public code (Zhong et al., TransReID, CLIP-ReID);
    published re-ranked numbers depend on that rounding (float32 moves them by ~1e-3)."""
    feats = np.concatenate([check_finite(qf, "the query features"),
                            check_finite(gf, "the gallery features")]).astype(np.float32)
    num_q, num_all = len(qf), len(feats)
    sq = np.square(feats).sum(1, keepdims=True)
    dist = sq + sq.T - 2 * feats @ feats.T
    dist = np.transpose(dist / np.max(dist, axis=0))  # column-normalised, as in the original
    initial_rank = np.argsort(dist, axis=1).astype(np.int32)

    def reciprocal_neighbours(k):
        # R[i, j]: j is among i's top-(k+1) neighbours and i among j's
        top = np.zeros((num_all, num_all), dtype=bool)
        np.put_along_axis(top, initial_rank[:, :k + 1].astype(np.int64), True, axis=1)
        return top & top.T

    recip = reciprocal_neighbours(k1)
    recip_half = reciprocal_neighbours(int(np.around(k1 / 2.0)))
    # expand R(i) by R(j, k1/2) for each j in R(i) when more than 2/3 of R(j, k1/2) is already in R(i)
    overlap = recip.astype(np.float32) @ recip_half.T.astype(np.float32)
    half_size = recip_half.sum(1)
    absorb = recip & (overlap > 2.0 / 3 * half_size[None, :])
    expanded = recip | ((absorb.astype(np.float32) @ recip_half.astype(np.float32)) > 0)

    V = np.zeros((num_all, num_all), dtype=np.float16)
    for i in range(num_all):  # per-row sums, in the original's order, so float16 rounding matches
        members = np.flatnonzero(expanded[i])
        weight = np.exp(-dist[i, members])
        V[i, members] = weight / np.sum(weight)
    if k2 != 1:
        V = np.mean(V[initial_rank[:, :k2]], axis=1)  # float32 accumulation, float16 result
    dist = dist[:num_q]
    V_columns = np.ascontiguousarray(V.T)
    jaccard = np.zeros((num_q, num_all), dtype=np.float16)
    for i in range(num_q):
        # float16 running sum over the query's non-zero columns in order, as the reference code does
        shared = np.zeros(num_all, dtype=np.float16)
        for j in np.flatnonzero(V[i]):
            shared += np.minimum(V[i, j], V_columns[j])
        jaccard[i] = 1 - shared / (2 - shared)
    final = jaccard * (1 - lambda_value) + dist * lambda_value
    return final[:, num_q:]
