"""Trains the small CNN on scikit-learn's bundled digits (8x8, 10 classes) that the INT8
accuracy test uses, with plain numpy (no torch), and writes it as ONNX with its data split.

    python -m venv /tmp/dv && /tmp/dv/bin/pip install scikit-learn numpy onnx
    /tmp/dv/bin/python tools/train_digits.py --out tests/models/digits

Writes (the test reads only these: CI needs neither scikit-learn nor this script):
  digits_cnn.onnx   input f32[N,1,8,8] (pixels / 16) -> logits f32[N,10]
                    Conv3x3(16)+Relu -> MaxPool2 -> Conv3x3(32)+Relu -> MaxPool2 -> Flatten -> Gemm(10)
  calib.npz         {"input": 256 training images}: calibration data (`nnc calibrate --data`)
  holdout.npz       {"input": the held-out images, "labels": their classes}: never trained on
Deterministic (seeded split, init and batch order): rerunning gives the same files on one numpy.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

SEED = 0
HOLDOUT = 360
CALIB = 256
EPOCHS = 30
BATCH = 32
LR = 2e-3


def im2col(x):  # [N,C,H,W] -> [N,H,W,C*9] (3x3, pad 1, stride 1)
    n, c, h, w = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.stack([xp[:, :, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=2)  # N,C,9,H,W
    return cols.reshape(n, c * 9, h, w).transpose(0, 2, 3, 1)


def col2im(dcols, shape):  # the adjoint of im2col
    n, c, h, w = shape
    d = dcols.transpose(0, 3, 1, 2).reshape(n, c, 9, h, w)
    dxp = np.zeros((n, c, h + 2, w + 2), dcols.dtype)
    k = 0
    for i in range(3):
        for j in range(3):
            dxp[:, :, i:i + h, j:j + w] += d[:, :, k]
            k += 1
    return dxp[:, :, 1:-1, 1:-1]


def conv_fwd(x, w, b):
    cols = im2col(x)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    return out.transpose(0, 3, 1, 2), cols


def conv_bwd(dout, cols, w, xshape):
    d = dout.transpose(0, 2, 3, 1)  # N,H,W,O
    dw = (d.reshape(-1, d.shape[-1]).T @ cols.reshape(-1, cols.shape[-1])).reshape(w.shape)
    db = d.sum(axis=(0, 1, 2))
    dx = col2im(d @ w.reshape(w.shape[0], -1), xshape)
    return dx, dw, db


def pool_fwd(x):
    n, c, h, w = x.shape
    r = x.reshape(n, c, h // 2, 2, w // 2, 2)
    m = r.max(axis=(3, 5))
    mask = r == m[:, :, :, None, :, None]
    mask = mask / mask.sum(axis=(3, 5), keepdims=True)  # ties share the gradient
    return m, mask


def pool_bwd(dout, mask):
    n, c, h, _, w, _ = mask.shape
    return (mask * dout[:, :, :, None, :, None]).reshape(n, c, h * 2, w * 2)


def forward(p, x):
    c1, k1 = conv_fwd(x, p["c1.w"], p["c1.b"])
    r1 = np.maximum(c1, 0)
    p1, m1 = pool_fwd(r1)
    c2, k2 = conv_fwd(p1, p["c2.w"], p["c2.b"])
    r2 = np.maximum(c2, 0)
    p2, m2 = pool_fwd(r2)
    f = p2.reshape(len(x), -1)
    logits = f @ p["fc.w"].T + p["fc.b"]
    return logits, (x, c1, k1, p1, m1, c2, k2, m2, f)


def backward(p, cache, dlogits):
    x, c1, k1, p1, m1, c2, k2, m2, f = cache
    g = {"fc.w": dlogits.T @ f, "fc.b": dlogits.sum(0)}
    df = dlogits @ p["fc.w"]
    dr2 = pool_bwd(df.reshape(len(x), 32, 2, 2), m2) * (c2 > 0)
    dp1, g["c2.w"], g["c2.b"] = conv_bwd(dr2, k2, p["c2.w"], p1.shape)
    dr1 = pool_bwd(dp1, m1) * (c1 > 0)
    _, g["c1.w"], g["c1.b"] = conv_bwd(dr1, k1, p["c1.w"], x.shape)
    return g


def train(x, y, rng):
    def he(*shape):
        fan_in = int(np.prod(shape[1:]))
        return (rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)
    p = {"c1.w": he(16, 1, 3, 3), "c1.b": np.zeros(16, np.float32),
         "c2.w": he(32, 16, 3, 3), "c2.b": np.zeros(32, np.float32),
         "fc.w": he(10, 128), "fc.b": np.zeros(10, np.float32)}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v2 = {k: np.zeros_like(v) for k, v in p.items()}
    t = 0
    for epoch in range(EPOCHS):
        order = rng.permutation(len(x))
        loss_sum = 0.0
        for s in range(0, len(x), BATCH):
            idx = order[s:s + BATCH]
            logits, cache = forward(p, x[idx])
            z = logits - logits.max(1, keepdims=True)
            prob = np.exp(z) / np.exp(z).sum(1, keepdims=True)
            loss_sum += float(-np.log(prob[np.arange(len(idx)), y[idx]] + 1e-12).sum())
            d = prob
            d[np.arange(len(idx)), y[idx]] -= 1
            g = backward(p, cache, (d / len(idx)).astype(np.float32))
            t += 1
            for k in p:  # Adam
                m[k] = 0.9 * m[k] + 0.1 * g[k]
                v2[k] = 0.999 * v2[k] + 0.001 * g[k] ** 2
                mh, vh = m[k] / (1 - 0.9 ** t), v2[k] / (1 - 0.999 ** t)
                p[k] = (p[k] - LR * mh / (np.sqrt(vh) + 1e-8)).astype(np.float32)
        print(f"epoch {epoch + 1:2d}: loss {loss_sum / len(x):.4f}")
    return p


def to_onnx(p):
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    inits = [numpy_helper.from_array(v, k) for k, v in p.items()]
    nodes = [
        helper.make_node("Conv", ["input", "c1.w", "c1.b"], ["c1"], name="conv1", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c1"], ["r1"], name="relu1"),
        helper.make_node("MaxPool", ["r1"], ["p1"], name="pool1", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "c2.w", "c2.b"], ["c2"], name="conv2", kernel_shape=[3, 3], pads=[1] * 4),
        helper.make_node("Relu", ["c2"], ["r2"], name="relu2"),
        helper.make_node("MaxPool", ["r2"], ["p2"], name="pool2", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["flat"], name="flatten"),
        helper.make_node("Gemm", ["flat", "fc.w", "fc.b"], ["logits"], name="fc", transB=1),
    ]
    g = helper.make_graph(nodes, "digits_cnn",
                          [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
                          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], producer_name="nnc tools/train_digits.py")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="tests/models/digits")
    args = ap.parse_args()
    from sklearn.datasets import load_digits
    import onnx
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target.astype(np.int64)
    rng = np.random.default_rng(SEED)
    perm = rng.permutation(len(x))
    test, tr = perm[:HOLDOUT], perm[HOLDOUT:]
    p = train(x[tr], y[tr], rng)
    acc = float((forward(p, x[test])[0].argmax(1) == y[test]).mean())
    print(f"held-out accuracy (numpy fp32): {acc * 100:.2f}% on {len(test)} images")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    onnx.save(to_onnx(p), out / "digits_cnn.onnx")
    np.savez_compressed(out / "calib.npz", input=x[tr[:CALIB]])
    np.savez_compressed(out / "holdout.npz", input=x[test], labels=y[test])


if __name__ == "__main__":
    main()
