"""Kinetics metrics on score matrices: top-k accuracy, mean error, mAP, per-class accuracy.

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
            video_labels: np.ndarray) -> dict:
    """The results table's figures for one set of scores (labelled rows only)."""
    f, v = frame_labels >= 0, video_labels >= 0
    top1, top5 = topk_accuracy(video_scores_[v], video_labels[v], 1), topk_accuracy(video_scores_[v], video_labels[v], 5)
    mAP, no_positive = mean_average_precision(video_scores_[v], video_labels[v])
    return {"frame_top1": topk_accuracy(frame_scores[f], frame_labels[f], 1),
            "frame_top3": topk_accuracy(frame_scores[f], frame_labels[f], 3),
            "video_top1": top1, "video_top5": top5, "mean_error": mean_error(top1, top5), "video_mAP": mAP,
            "classes_without_videos": no_positive, "frames": int(f.sum()), "videos": int(v.sum()),
            "frames_non_finite": int((~finite_rows(frame_scores[f])).sum()),
            "videos_non_finite": int((~finite_rows(video_scores_[v])).sum())}
