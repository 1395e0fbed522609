"""Verification metrics of a query/gallery evaluation: EER, TAR at fixed FAR, ROC AUC and the ROC
curve. numpy only: importable without torch.

Pairs are every query x gallery pair of the score matrix; a pair is genuine when both images have the
same identity, an impostor pair otherwise. A higher score means "more alike" (pass -distance for
distances). A pair is accepted at threshold t when its score >= t.

Ties: pairs with equal scores are accepted or rejected together (every threshold is a score value or
lies between two of them), so the ROC curve has one vertex per distinct score and a tie of genuine and
impostor pairs is a diagonal segment of the curve. In the AUC a genuine-impostor tie counts one half.
"""
import numpy as np

from .metrics import check_finite

FAR_TARGETS = (1e-1, 1e-2, 1e-3, 1e-4)
MIN_FALSE_ACCEPTS = 10  # a TAR at FAR f is reported only when f x impostor pairs >= this
ROC_FAR_GRID = np.logspace(-6, 0, 49)  # 8 points a decade: the FARs at which ROC curves are stored


def far_name(far):
    return f"TAR@{far:.0e}".replace("e-0", "e-")


VERIFICATION_NAMES = ("EER", "AUC", *(far_name(f) for f in FAR_TARGETS))
VERIFICATION_LABELS = {"EER": "EER", "AUC": "ROC AUC", **{far_name(f): f"TAR@FAR={f:.0e}".replace("e-0", "e-")
                                                         for f in FAR_TARGETS}}


def pair_scores(scores, q_labels, g_labels):
    """Sorted (ascending) genuine and impostor scores of every query x gallery pair."""
    scores = check_finite(scores, "the score matrix")
    _, codes = np.unique(np.concatenate([np.asarray(q_labels), np.asarray(g_labels)]), return_inverse=True)
    q_codes, g_codes = codes[:len(scores)], codes[len(scores):]
    genuine = q_codes[:, None] == g_codes[None, :]
    return np.sort(scores[genuine]), np.sort(scores[~genuine])


def _accepted(ascending, thresholds, strictly_above):
    """How many of the ascending scores are > (strictly_above) or >= each threshold."""
    return len(ascending) - np.searchsorted(ascending, thresholds, side="right" if strictly_above else "left")


def equal_error_rate(genuine, impostor):
    """EER of ascending genuine and impostor scores. The ROC curve is the polyline through the points
    (FAR(t), FRR(t)) for every distinct score t in descending order, from (0, 1) (nothing accepted) to
    (1, 0) (everything accepted), where FAR(t) = impostor scores >= t / impostors and
    FRR(t) = 1 - genuine scores >= t / genuines. The EER is the FAR (= FRR) where this polyline crosses
    the line FAR = FRR, found by linear interpolation on the segment whose end points lie on either side
    of it (the first point with FAR >= FRR ends that segment). Runs of impostor-only scores lie on a
    horizontal segment, so only the points just above and at each genuine score are needed."""
    genuine, impostor = check_finite(genuine, "the genuine scores"), check_finite(impostor, "the impostor scores")
    levels = np.unique(genuine)[::-1]
    far = np.empty(2 * len(levels) + 2)
    frr = np.empty_like(far)
    far[0], frr[0], far[-1], frr[-1] = 0.0, 1.0, 1.0, 0.0
    for offset, strictly_above in ((1, True), (2, False)):
        far[offset:-1:2] = _accepted(impostor, levels, strictly_above) / len(impostor)
        frr[offset:-1:2] = 1 - _accepted(genuine, levels, strictly_above) / len(genuine)
    gap = far - frr  # non-decreasing along the curve, from -1 to 1
    k = int(np.argmax(gap >= 0))
    alpha = -gap[k - 1] / (gap[k] - gap[k - 1])
    return float(far[k - 1] + alpha * (far[k] - far[k - 1]))


def roc_auc(genuine, impostor):
    """Probability that a genuine pair scores above an impostor pair, a tie counting one half."""
    genuine, impostor = check_finite(genuine, "the genuine scores"), check_finite(impostor, "the impostor scores")
    below = np.searchsorted(impostor, genuine, side="left")
    ties = np.searchsorted(impostor, genuine, side="right") - below
    return float((below.sum() + 0.5 * ties.sum()) / (len(genuine) * len(impostor)))


def threshold_at_far(impostor, far):
    """The decision threshold of FAR `far` on ascending impostor scores: with m = floor(far x impostors)
    false accepts allowed, the (m+1)-th highest impostor score; accepting the scores strictly above it
    accepts at most m impostors (-inf when every impostor may be accepted). One value per entry of `far`."""
    impostor = check_finite(impostor, "the impostor scores")
    allowed = np.floor(np.asarray(far, dtype=np.float64) * len(impostor) * (1 + 1e-12)).astype(np.int64)
    return np.where(allowed < len(impostor), impostor[::-1][np.minimum(allowed, len(impostor) - 1)], -np.inf)


def tar_at_far(genuine, impostor, far):
    """Highest TAR over the thresholds whose FAR is at most `far` (no interpolation): accept the scores
    strictly above threshold_at_far. Returns TAR values, one per entry of `far`."""
    genuine = check_finite(genuine, "the genuine scores")
    return _accepted(genuine, threshold_at_far(impostor, far), strictly_above=True) / len(genuine)


def verification_metrics(scores, q_labels, g_labels, far_targets=FAR_TARGETS,
                         min_false_accepts=MIN_FALSE_ACCEPTS):
    """EER, AUC and TAR@FAR for each of `far_targets` (None when far x impostor pairs < min_false_accepts:
    too few impostors to measure it; never extrapolated), the pair counts, and the ROC curve on
    ROC_FAR_GRID ({"far", "tar", "threshold"}: a pair is accepted at a FAR when its score is strictly above
    that FAR's threshold; TAR and threshold None where not even one false accept is allowed, the threshold
    also at FAR 1, which accepts every pair).
    All None when the pairs are all genuine or all impostor."""
    genuine, impostor = pair_scores(scores, q_labels, g_labels)
    out = {"num_genuine_pairs": len(genuine), "num_impostor_pairs": len(impostor)}
    if len(genuine) == 0 or len(impostor) == 0:
        return {**out, **{k: None for k in VERIFICATION_NAMES}, "roc": None}
    out["EER"] = equal_error_rate(genuine, impostor)
    out["AUC"] = roc_auc(genuine, impostor)
    tars = tar_at_far(genuine, impostor, far_targets)
    for far, tar in zip(far_targets, tars):
        out[far_name(far)] = float(tar) if far * len(impostor) >= min_false_accepts else None
    grid_tar = tar_at_far(genuine, impostor, ROC_FAR_GRID)
    grid_threshold = threshold_at_far(impostor, ROC_FAR_GRID)
    measurable = ROC_FAR_GRID * len(impostor) >= 1
    out["roc"] = {"far": ROC_FAR_GRID.tolist(),
                  "tar": [float(t) if ok else None for ok, t in zip(measurable, grid_tar)],
                  "threshold": [float(t) if ok and np.isfinite(t) else None  # FAR 1 accepts all: no threshold
                                for ok, t in zip(measurable, grid_threshold)]}
    return out


def mean_std_or_none(values):
    """(mean, sample std (ddof 1, as io.mean_std) over splits) of a metric, or (None, None) when any
    split could not measure it."""
    if any(v is None for v in values):
        return None, None
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def mean_roc(rocs):
    """The mean of ROC curves stored on ROC_FAR_GRID: TAR (and the threshold, where the curves store
    one) averaged at each FAR where every curve has one."""
    rocs = [r for r in rocs if r]
    if not rocs:
        return None
    out = {"far": rocs[0]["far"]}
    for key in ("tar", "threshold"):
        if all(key in r for r in rocs):
            out[key] = [None if None in c else float(np.mean(c)) for c in zip(*(r[key] for r in rocs))]
    return out
