"""
Segmentation metrics with mmseg's IoUMetric semantics, from a confusion matrix accumulated in int64 on
the device (and summed across DDP ranks by the caller with one all_reduce).
"""

import torch


def confusion_matrix(pred, target, num_classes, ignore_index=255):
    """pred, target: (...) class ids on one device -> (K, K) int64, rows = ground truth, cols = prediction.

    Pixels whose target is ignore_index are skipped; a prediction outside [0, K) is an error.
    """
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f"predictions outside [0, {num_classes})")
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        raise ValueError(f"ground-truth ids outside [0, {num_classes}) and not {ignore_index}: "
                         f"{torch.unique(t[(t < 0) | (t >= num_classes)]).tolist()}")
    return torch.bincount(t * num_classes + p, minlength=num_classes**2).view(num_classes, num_classes)


def segmentation_scores(cm):
    """(K, K) confusion matrix -> dict: per-class IoU and F1 (NaN for classes absent from both ground
    truth and prediction), mIoU and mean F1 over the other classes, overall accuracy. All in [0, 1]."""
    cm = cm.double()
    tp = cm.diag()
    gt, pr = cm.sum(1), cm.sum(0)
    union = gt + pr - tp
    present = union > 0
    nan = torch.full_like(tp, float("nan"))
    iou = torch.where(present, tp / union.clamp_min(1), nan)
    f1 = torch.where(present, 2 * tp / (gt + pr).clamp_min(1), nan)
    return {
        "iou": iou.tolist(),
        "f1": f1.tolist(),
        "miou": iou[present].mean().item() if present.any() else float("nan"),
        "mean_f1": f1[present].mean().item() if present.any() else float("nan"),
        "accuracy": (tp.sum() / cm.sum()).item() if cm.sum() > 0 else float("nan"),
    }
