"""
Segmentation metrics with mmseg's IoUMetric semantics, from a confusion matrix accumulated in int64 on
the device, and the one evaluation loop that train.py and eval.py share (summed across DDP ranks).
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


@torch.no_grad()
def evaluate(model, batches, device, world=1, logits_of=None):
    """Scores of a Segmenter on `batches`, an iterable of (images (B, C, H, W), labels (B, H, W)), plus the
    per-block expert-load fractions (L, E) and the mean raw descriptors [H_DE, ENL, R_LR] of the images.

    The one evaluation loop of train.py and eval.py. logits_of(images) -> (B, K, H, W) replaces the
    whole-tile forward (eval.py's sliding windows; no routing statistics then). Under DDP (world > 1)
    each process passes its own share of the tiles, any number of them: the only collective is the
    final sum of the confusion matrix and the statistics.
    """
    cfg = model.cfg
    K = cfg.num_classes
    cm = torch.zeros(K, K, dtype=torch.long, device=device)
    load = torch.zeros((cfg.depth, cfg.n_experts) if cfg.n_experts > 1 else (0, 1), dtype=torch.long, device=device)
    descriptors = torch.zeros(3, dtype=torch.float64, device=device)
    tiles = torch.zeros((), dtype=torch.float64, device=device)
    for images, labels in batches:
        images, labels = images.to(device), labels.to(device)
        if logits_of is None:
            out = model(images)
            logits, load, descriptors = out.logits, load + out.expert_load, descriptors + out.descriptors.double().sum(0)
        else:
            logits = logits_of(images)
        cm += confusion_matrix(logits.argmax(1), labels, K)
        tiles += len(images)
    if world > 1:
        for t in (cm, load, descriptors, tiles):
            torch.distributed.all_reduce(t)
    fractions = (load.double() / load.sum(1, keepdim=True).clamp_min(1)).tolist()
    seen = tiles.clamp_min(1) if logits_of is None else torch.ones_like(tiles)
    return {**segmentation_scores(cm), "expert_load": fractions if logits_of is None else [],
            "mean_descriptors": (descriptors / seen).tolist(), "tiles": int(tiles.item())}
