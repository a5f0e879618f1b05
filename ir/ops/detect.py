"""Detection ops: NonMaxSuppression (data-dependent result count: i64[?, 3])."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..registry import register
from ..symbolic import UNKNOWN
from ..types import I64, TensorType


@dataclass(frozen=True)
class NMSAttrs:
    center_point_box: int = 0


def _nms_infer(ctx):
    sb, ss = ctx.shape(0), ctx.shape(1)
    if len(sb) != 3 or len(ss) != 3:
        ctx.fail(f"boxes must be [B,N,4] and scores [B,C,N], got ranks {len(sb)} and {len(ss)}")
    return [TensorType(I64, (UNKNOWN, 3))]


def _corners(boxes, center):
    b = boxes.astype(np.float64)
    if center:
        x0, x1 = b[:, 0] - b[:, 2] / 2, b[:, 0] + b[:, 2] / 2
        y0, y1 = b[:, 1] - b[:, 3] / 2, b[:, 1] + b[:, 3] / 2
    else:
        y0, y1 = np.minimum(b[:, 0], b[:, 2]), np.maximum(b[:, 0], b[:, 2])
        x0, x1 = np.minimum(b[:, 1], b[:, 3]), np.maximum(b[:, 1], b[:, 3])
    return x0, y0, x1, y1


def _scalar(v, default, cast):
    if v is None or np.asarray(v).size == 0:
        return default
    return cast(np.asarray(v).reshape(-1)[0])


def _nms_ref(a, boxes, scores, max_out=None, iou_th=None, score_th=None):
    max_out = max(_scalar(max_out, 0, int), 0)
    iou = _scalar(iou_th, 0.0, float)
    sth = _scalar(score_th, None, float)
    out = []
    nb, nc, n = scores.shape
    for b in range(nb):
        x0, y0, x1, y1 = _corners(boxes[b], a.center_point_box)
        area = (x1 - x0) * (y1 - y0)
        for c in range(nc):
            sc = scores[b, c].astype(np.float64)
            cand = np.arange(n) if sth is None else np.nonzero(sc > sth)[0]
            # highest score first; equal scores: lower box index first
            cand = cand[np.lexsort((cand, -sc[cand]))]
            kept: list = []
            for i in cand:
                if len(kept) >= max_out:
                    break
                if kept:
                    k = np.array(kept)
                    iw = np.minimum(x1[i], x1[k]) - np.maximum(x0[i], x0[k])
                    ih = np.minimum(y1[i], y1[k]) - np.maximum(y0[i], y0[k])
                    inter = iw * ih
                    union = area[i] + area[k] - inter
                    valid = (iw > 0) & (ih > 0) & (area[i] > 0) & (area[k] > 0) & (union > 0)
                    with np.errstate(all="ignore"):
                        ratio = np.where(valid, inter / np.where(union > 0, union, 1), 0.0)
                    if np.any(valid & (ratio > iou)):
                        continue
                kept.append(int(i))
                out.append((b, c, int(i)))
    return np.array(out, dtype=np.int64).reshape(-1, 3)


register("NonMaxSuppression", NMSAttrs, infer=_nms_infer, ref=_nms_ref, inputs=(2, 5))
