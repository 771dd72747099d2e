"""Kinetics metrics on score matrices: top-k accuracy, mean error, mAP (two kinds), per-class accuracy.

Two video mAPs, as they differ (by 0.05 on one run): `video_mAP_sklearn`, the AP of every
video's score for every class (scikit-learn's average_precision_score, non-interpolated), and
`video_mAP_anet`, ActivityNet's official evaluation of a Kinetics result file (its
eval_classification.py): each video submits its top 5 labels only, and the AP is interpolated.
Published Kinetics mAPs are the latter.

Ties count against the prediction: the true class is within the top k only if fewer than
k other classes score at least as high (so constant scores get no credit). A row holding a
non-finite score (NaN or inf: a diverged model) is always wrong: it ranks last for every
class, and has no place in the confusion matrix. Comparisons with NaN are all false, which
would otherwise make such a row "first".
"""
from __future__ import annotations

import argparse

import numpy as np


def finite_rows(scores: np.ndarray) -> np.ndarray:
    """True for each row whose scores are all finite."""
    return np.isfinite(scores).all(axis=1)


def true_class_rank(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """For each row, how many other classes score >= the true class (0 = strictly first); C for a non-finite row."""
    true = scores[np.arange(len(labels)), labels]
    rank = (scores >= true[:, None]).sum(axis=1) - 1
    return np.where(finite_rows(scores), rank, scores.shape[1])


def topk_accuracy(scores: np.ndarray, labels: np.ndarray, k: int) -> float:
    if len(labels) == 0:
        return float("nan")
    return float((true_class_rank(scores, labels) < k).mean())


def mean_error(top1: float, top5: float) -> float:
    """The ActivityNet Kinetics challenge metric."""
    return 1.0 - (top1 + top5) / 2.0


def average_precision(scores: np.ndarray, positive: np.ndarray) -> float:
    """Area under the precision-recall curve, stepping at each distinct score (as scikit-learn).

    NaN when there is no positive: such a class has no defined AP and is left out of mAP.
    """
    n_pos = positive.sum()
    if n_pos == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    last_of_tie = np.r_[scores[1:] != scores[:-1], True]  # a threshold takes a whole group of ties (-inf ones too)
    tp = np.cumsum(positive)[last_of_tie]
    seen = (np.arange(1, len(scores) + 1))[last_of_tie]
    precision, recall = tp / seen, tp / n_pos
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def mean_average_precision(scores: np.ndarray, labels: np.ndarray) -> tuple[float, int]:
    """(mAP over classes with positives, number of classes left out for having none).

    Non-finite rows score -inf for every class: they come last, tied, below every finite row.
    """
    scores = np.where(finite_rows(scores)[:, None], scores, -np.inf)
    aps = np.array([average_precision(scores[:, c], labels == c) for c in range(scores.shape[1])])
    defined = ~np.isnan(aps)
    return (float(aps[defined].mean()) if defined.any() else float("nan")), int((~defined).sum())


def interpolated_ap(precision: np.ndarray, recall: np.ndarray) -> float:
    """The area under the precision-recall curve with precision made non-increasing (PASCAL VOC 2011's, as ActivityNet's
    interpolated_prec_rec): recall runs to 1 with precision 0 past the last hit."""
    p = np.maximum.accumulate(np.r_[0.0, precision, 0.0][::-1])[::-1]
    r = np.r_[0.0, recall, 1.0]
    steps = np.nonzero(r[1:] != r[:-1])[0] + 1
    return float(np.sum((r[steps] - r[steps - 1]) * p[steps]))


def activitynet_map(scores: np.ndarray, labels: np.ndarray, top: int = 5) -> float:
    """ActivityNet's mAP of a Kinetics result file (compute_average_precision_classification in its
    eval_classification.py): each video submits its `top` best classes with their scores; per class, the videos
    that submitted it, best score first, are hits where it is their label; AP is interpolated_ap with recall over
    all the class's videos (one that did not submit its class is never found), mean over the classes with videos.

    Its ties (one score on two videos) fall in input order here; a non-finite row submits nothing.
    """
    submitted = np.zeros(scores.shape, dtype=bool)
    finite = finite_rows(scores)
    best = np.argsort(-np.where(finite[:, None], scores, 0), axis=1, kind="stable")[:, :top]
    np.put_along_axis(submitted, best, True, axis=1)
    submitted &= finite[:, None]
    aps = []
    for c in np.unique(labels):
        rows = np.nonzero(submitted[:, c])[0]
        hits = labels[rows[np.argsort(-scores[rows, c], kind="stable")]] == c
        found = np.cumsum(hits)
        aps.append(interpolated_ap(found / np.arange(1, len(hits) + 1), found / (labels == c).sum()))
    return float(np.mean(aps)) if aps else float("nan")


def per_class_accuracy(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Top-1 accuracy of each class's own samples (NaN for a class without samples)."""
    correct = true_class_rank(scores, labels) == 0
    return np.array([correct[labels == c].mean() if (labels == c).any() else np.nan for c in range(scores.shape[1])])


def confusion_matrix(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """counts[true, predicted] with predicted = argmax; non-finite rows have no prediction and are left out."""
    n, finite = scores.shape[1], finite_rows(scores)
    return np.bincount(labels[finite] * n + scores[finite].argmax(1), minlength=n * n).reshape(n, n)


def class_topk_arg(text: str) -> int:
    """argparse type of --class-topk: 0 (the mean of all frames) or K > 0 (a negative K would drop frames silently)."""
    k = int(text)
    if k < 0:
        raise argparse.ArgumentTypeError(f"{text}: give 0 (the mean of all frames) or K > 0")
    return k


def video_scores(frame_scores: np.ndarray, videos: np.ndarray, class_topk: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(video ids, V x C scores) from frame scores: the mean over a video's frames, or, with
    class_topk K, per class the mean of its K highest frame scores (the original's choice)."""
    ids, inverse = np.unique(videos, return_inverse=True)
    if not class_topk:
        sums = np.zeros((len(ids), frame_scores.shape[1]))
        np.add.at(sums, inverse, frame_scores)
        return ids, sums / np.bincount(inverse, minlength=len(ids))[:, None]
    out = np.zeros((len(ids), frame_scores.shape[1]))
    for v in range(len(ids)):
        frames = np.sort(frame_scores[inverse == v], axis=0)[::-1]
        out[v] = frames[:class_topk].mean(axis=0)
    return ids, out


def summary(frame_scores: np.ndarray, frame_labels: np.ndarray, video_scores_: np.ndarray,
            video_labels: np.ndarray, submitted: np.ndarray | None = None) -> dict:
    """The results table's figures for one set of scores (labelled rows only).

    submitted: the video scores a result file would hold (probabilities), for video_mAP_anet, where video_scores_
    are other values (logits); default video_scores_.
    """
    f, v = frame_labels >= 0, video_labels >= 0
    submitted = video_scores_ if submitted is None else submitted
    top1, top5 = topk_accuracy(video_scores_[v], video_labels[v], 1), topk_accuracy(video_scores_[v], video_labels[v], 5)
    mAP, no_positive = mean_average_precision(video_scores_[v], video_labels[v])
    return {"frame_top1": topk_accuracy(frame_scores[f], frame_labels[f], 1),
            "frame_top3": topk_accuracy(frame_scores[f], frame_labels[f], 3),
            "video_top1": top1, "video_top5": top5, "mean_error": mean_error(top1, top5),
            "video_mAP_sklearn": mAP, "video_mAP_anet": activitynet_map(submitted[v], video_labels[v]),
            "classes_without_videos": no_positive, "frames": int(f.sum()), "videos": int(v.sum()),
            "frames_non_finite": int((~finite_rows(frame_scores[f])).sum()),
            "videos_non_finite": int((~finite_rows(video_scores_[v])).sum())}
