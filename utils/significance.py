"""Training seeds and significance for results tables: the evaluations of one setting trained with
several --seed values form one row (mean ± std over the seeds, the std over the Monte-Carlo splits
beside it), and every row is compared with the best row of its column by a paired Wilcoxon
signed-rank test.

"Paired" means: the two rows are measured on the same query/gallery splits (same split root, same
split seed), and the pairs are the per-split values, one pair per (seed, split) when both rows were
trained with the same seeds, else one pair per split of the rows' means over their seeds (e.g. a
deterministic zero-shot row against a row trained with three seeds). With n pairs the smallest
two-sided p-value is 2 / 2^n (10 pairs: 0.002; 5: 0.0625; 3: 0.25), so below 6 pairs no difference
can be significant at 0.05, and the splits overlap (their queries differ by one image per identity),
so the pairs are not independent: p-values are a guide, not a proof.

Depends on nothing in the package (numpy and scipy)."""
import math

import numpy as np
from scipy import stats

ALPHA = 0.05
# metrics where a lower value is better
LOWER_IS_BETTER = frozenset({"EER"})


def smallest_p_value(num_pairs):
    """The smallest two-sided p-value the exact Wilcoxon test can give with num_pairs nonzero differences."""
    return min(1.0, 2.0 / 2 ** num_pairs) if num_pairs > 0 else 1.0


def aggregate(per_seed):
    """per_seed: {seed: [value per split]} (a value None where the split could not measure it).
    Returns {"mean", "std_seeds" (sample std of the per-seed means; None for one seed), "std_splits"
    (mean over the seeds of the sample std over splits; None for one split), "num_seeds", "num_splits"};
    mean and stds are None when any value is None."""
    values = list(per_seed.values())
    out = {"num_seeds": len(values), "num_splits": len(values[0]) if values else 0}
    if not values or any(v is None for split_values in values for v in split_values):
        return dict(out, mean=None, std_seeds=None, std_splits=None)
    seed_means = [float(np.mean(v)) for v in values]
    one_split = any(len(v) < 2 for v in values)
    return dict(out, mean=float(np.mean(seed_means)),
                std_seeds=float(np.std(seed_means, ddof=1)) if len(seed_means) > 1 else None,
                std_splits=None if one_split else float(np.mean([np.std(v, ddof=1) for v in values])))


def paired_values(a, b):
    """The pairs of two rows' per-split values. a, b: {seed: {split: value}}. One pair per common
    (seed, split) when both rows have the same seeds, else one per common split of the means over
    each row's seeds. Pairs with a None are dropped. Returns two float arrays."""
    if set(a) == set(b):
        keys = [(s, i) for s in sorted(a, key=str) for i in sorted(set(a[s]) & set(b[s]))]
        x = [a[s][i] for s, i in keys]
        y = [b[s][i] for s, i in keys]
    else:
        splits = sorted(set.intersection(*(set(v) for v in a.values())) & set.intersection(*(set(v) for v in b.values())))
        x = [_mean_or_none([a[s][i] for s in a]) for i in splits]
        y = [_mean_or_none([b[s][i] for s in b]) for i in splits]
    kept = [(u, v) for u, v in zip(x, y) if u is not None and v is not None]
    return np.array([u for u, _ in kept], float), np.array([v for _, v in kept], float)


def _mean_or_none(values):
    return None if any(v is None for v in values) else float(np.mean(values))


def wilcoxon_p(x, y):
    """Two-sided Wilcoxon signed-rank p-value of paired samples (scipy.stats.wilcoxon, its defaults:
    zero differences dropped, exact distribution for small samples without ties). 1.0 when every
    difference is zero (the rows are equal on every pair); None without pairs."""
    if len(x) == 0:
        return None
    if np.all(x == y):
        return 1.0
    return float(stats.wilcoxon(x, y).pvalue)


def compare_with_best(rows, metric, alpha=ALPHA):
    """rows: [{"values": {seed: {split: value}}, "mean": float or None, "num_splits": n}] of one comparison
    group (the same test set and splits). Finds the best row (highest mean; lowest for LOWER_IS_BETTER)
    among those measured on the group's most splits (a mean over fewer splits is not comparable) and
    tests every other row against it. Returns one dict per row: {"best": bool, "p": p-value against the best
    (None for the best row and where nothing pairs), "pairs": n, "tied": True when the row is not
    significantly below the best (p >= alpha; the best row too)}."""
    means = [r["mean"] for r in rows]
    measured = [i for i, m in enumerate(means) if m is not None and not math.isnan(m)]
    out = [{"best": False, "p": None, "pairs": 0, "tied": False} for _ in rows]
    if not measured:
        return out
    sign = -1 if metric in LOWER_IS_BETTER else 1
    most = max(rows[i].get("num_splits", 0) for i in measured)
    eligible = [i for i in measured if rows[i].get("num_splits", 0) == most]
    best = max(eligible, key=lambda i: sign * means[i])  # the first of equal means
    out[best].update(best=True, tied=True)
    for i in measured:
        if i == best:
            continue
        x, y = paired_values(rows[i]["values"], rows[best]["values"])
        p = wilcoxon_p(x, y)
        out[i].update(p=p, pairs=len(x), tied=p is not None and (p >= alpha or means[i] == means[best]))
    return out
