#!/usr/bin/env python3
"""Train the bundled demo model and write it, with its data, into ``models/``.

Usage::

    python models/make_digits_cnn.py [--out-dir models] [--epochs 40]

What it does, deterministically (fixed seeds, single-threaded BLAS, no download):

1. Loads scikit-learn's bundled ``load_digits`` (1,797 8x8 grayscale digits, pixel values 0..16, 10 classes)
   and makes a stratified split: 1,200 training samples / 597 held out.
2. Trains a small CNN in plain NumPy (im2col convolutions, batch norm, ReLU, max-pool, dropout,
   two fully connected layers, softmax cross-entropy, Adam).
3. Writes the network as an ONNX graph built by hand with ``onnx.helper``. The graph deliberately looks like
   a typical PyTorch export that an optimizer should clean up: an explicit ``Pad`` node in front of a
   padding-free ``Conv``, separate ``BatchNormalization`` nodes carrying trained statistics, an ``Identity``,
   a ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` flatten (``x.view(x.size(0), -1)``) and an
   inference-mode ``Dropout``.
4. Writes the validation set (the held-out 597), its labels, a 200-sample calibration set taken from the
   training split, and ``digits_cnn.json`` with the accuracy ONNX Runtime measures on the validation set.

Preprocessing (done here, already applied to the .npz files): ``x = (pixels / 16 - 0.5) / 0.5``, float32,
shape [N, 1, 8, 8].

Running the script twice produces byte-identical files.
"""

from __future__ import annotations

import os

# Single-threaded BLAS so the floating-point reduction order (and thus the trained weights) never depends on
# the number of cores or the caller's environment (with 2 BLAS threads the weights differ in the last bits
# and the validation accuracy moves by one sample). Must be set before NumPy is imported; the model is tiny.
for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import time  # noqa: E402
import zipfile  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import onnx  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

SEED = 0
SPLIT_SEED = 42
N_TRAIN = 1200
N_VAL = 597
N_CALIB = 200
BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention: running = (1 - m) * running + m * batch
DROPOUT = 0.25
OPSET = 17
IR_VERSION = 8
ZIP_DATE = (1980, 1, 1, 0, 0, 0)

MODEL_NAME = "digits_cnn.onnx"
VAL_NAME = "digits_val.npz"
LABELS_NAME = "digits_val_labels.npy"
CALIB_NAME = "digits_calib.npz"
META_NAME = "digits_cnn.json"


# ----------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------


def preprocess(pixels: np.ndarray) -> np.ndarray:
    """Raw digits pixels (0..16, shape [n, 64]) -> float32 [n, 1, 8, 8] scaled to [-1, 1]."""
    x = (np.asarray(pixels, dtype=np.float32) / np.float32(16.0) - np.float32(0.5)) / np.float32(0.5)
    return x.reshape(-1, 1, 8, 8).astype(np.float32)


def load_split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = preprocess(digits.data)
    y = digits.target.astype(np.int64)
    x_tr, x_val, y_tr, y_val = train_test_split(
        x, y, train_size=N_TRAIN, test_size=N_VAL, stratify=y, random_state=SPLIT_SEED
    )
    # Calibration set: a stratified 200-sample subset of the *training* split (never the validation set).
    calib_idx, _ = train_test_split(
        np.arange(len(y_tr)), train_size=N_CALIB, stratify=y_tr, random_state=SPLIT_SEED
    )
    calib_idx = np.sort(calib_idx)
    return x_tr, y_tr, x_val, y_val, x_tr[calib_idx]


# ----------------------------------------------------------------------------------------------------------
# NumPy layers (forward returns a cache, backward consumes it)
# ----------------------------------------------------------------------------------------------------------


def conv3x3_forward(x, w, b):
    """3x3 conv, stride 1, 1-pixel zero padding. x [N,C,H,W], w [O,C,3,3], b [O] -> [N,O,H,W]."""
    n, c, h, wd = x.shape
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    cols = np.lib.stride_tricks.sliding_window_view(xp, (3, 3), axis=(2, 3))  # [N,C,H,W,3,3]
    cols = cols.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * wd, c * 9)
    out = cols @ w.reshape(w.shape[0], -1).T + b
    out = out.reshape(n, h, wd, -1).transpose(0, 3, 1, 2)
    return np.ascontiguousarray(out), (x.shape, cols, w)


def conv3x3_backward(dout, cache):
    (n, c, h, wd), cols, w = cache
    o = w.shape[0]
    d = dout.transpose(0, 2, 3, 1).reshape(-1, o)
    dw = (d.T @ cols).reshape(w.shape)
    db = d.sum(axis=0)
    dcols = (d @ w.reshape(o, -1)).reshape(n, h, wd, c, 3, 3)
    dxp = np.zeros((n, c, h + 2, wd + 2), dtype=dout.dtype)
    for i in range(3):
        for j in range(3):
            dxp[:, :, i : i + h, j : j + wd] += dcols[:, :, :, :, i, j].transpose(0, 3, 1, 2)
    return dxp[:, :, 1:-1, 1:-1], dw, db


def bn_forward_train(x, gamma, beta):
    mu = x.mean(axis=(0, 2, 3))
    var = x.var(axis=(0, 2, 3))
    inv_std = 1.0 / np.sqrt(var + BN_EPS)
    xhat = (x - mu[None, :, None, None]) * inv_std[None, :, None, None]
    out = gamma[None, :, None, None] * xhat + beta[None, :, None, None]
    return out, (xhat, inv_std, gamma), mu, var


def bn_forward_eval(x, gamma, beta, mean, var):
    scale = gamma / np.sqrt(var + BN_EPS)
    return x * scale[None, :, None, None] + (beta - mean * scale)[None, :, None, None]


def bn_backward(dout, cache):
    xhat, inv_std, gamma = cache
    m = dout.shape[0] * dout.shape[2] * dout.shape[3]
    dbeta = dout.sum(axis=(0, 2, 3))
    dgamma = (dout * xhat).sum(axis=(0, 2, 3))
    dxhat = dout * gamma[None, :, None, None]
    dx = (inv_std[None, :, None, None] / m) * (
        m * dxhat
        - dxhat.sum(axis=(0, 2, 3))[None, :, None, None]
        - xhat * (dxhat * xhat).sum(axis=(0, 2, 3))[None, :, None, None]
    )
    return dx, dgamma, dbeta


def maxpool2_forward(x):
    n, c, h, w = x.shape
    win = x.reshape(n, c, h // 2, 2, w // 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h // 2, w // 2, 4)
    idx = win.argmax(axis=-1)
    out = np.take_along_axis(win, idx[..., None], axis=-1)[..., 0]
    return out, (x.shape, idx)


def maxpool2_backward(dout, cache):
    (n, c, h, w), idx = cache
    dwin = np.zeros((n, c, h // 2, w // 2, 4), dtype=dout.dtype)
    np.put_along_axis(dwin, idx[..., None], dout[..., None], axis=-1)
    return dwin.reshape(n, c, h // 2, w // 2, 2, 2).transpose(0, 1, 2, 4, 3, 5).reshape(n, c, h, w)


# ----------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------


def init_params(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """PyTorch-style default init (uniform +-1/sqrt(fan_in)) with He scaling for the weights."""

    def uni(shape, fan_in, gain=1.0):
        bound = gain * np.sqrt(3.0 / fan_in)
        return rng.uniform(-bound, bound, size=shape).astype(np.float32)

    relu_gain = np.sqrt(2.0)
    return {
        "conv1.weight": uni((16, 1, 3, 3), 9, relu_gain),
        "conv1.bias": uni((16,), 9, 1 / np.sqrt(3.0)),
        "bn1.weight": np.ones(16, np.float32),
        "bn1.bias": np.zeros(16, np.float32),
        "conv2.weight": uni((32, 16, 3, 3), 144, relu_gain),
        "conv2.bias": uni((32,), 144, 1 / np.sqrt(3.0)),
        "bn2.weight": np.ones(32, np.float32),
        "bn2.bias": np.zeros(32, np.float32),
        "fc1.weight": uni((64, 512), 512, relu_gain),
        "fc1.bias": uni((64,), 512, 1 / np.sqrt(3.0)),
        "fc2.weight": uni((10, 64), 64),
        "fc2.bias": uni((10,), 64, 1 / np.sqrt(3.0)),
    }


def init_buffers() -> dict[str, np.ndarray]:
    return {
        "bn1.running_mean": np.zeros(16, np.float32),
        "bn1.running_var": np.ones(16, np.float32),
        "bn2.running_mean": np.zeros(32, np.float32),
        "bn2.running_var": np.ones(32, np.float32),
    }


def forward_eval(p, buf, x):
    h = conv3x3_forward(x, p["conv1.weight"], p["conv1.bias"])[0]
    h = np.maximum(
        bn_forward_eval(h, p["bn1.weight"], p["bn1.bias"], buf["bn1.running_mean"], buf["bn1.running_var"]), 0
    )
    h = conv3x3_forward(h, p["conv2.weight"], p["conv2.bias"])[0]
    h = np.maximum(
        bn_forward_eval(h, p["bn2.weight"], p["bn2.bias"], buf["bn2.running_mean"], buf["bn2.running_var"]), 0
    )
    h = maxpool2_forward(h)[0].reshape(x.shape[0], -1)
    h = np.maximum(h @ p["fc1.weight"].T + p["fc1.bias"], 0)
    return h @ p["fc2.weight"].T + p["fc2.bias"]


def train_step(p, buf, x, y, rng):
    """Forward + backward on one mini-batch (training mode). Updates BN running stats; returns loss, grads."""
    n = x.shape[0]
    a1, c1 = conv3x3_forward(x, p["conv1.weight"], p["conv1.bias"])
    b1, cb1, mu1, var1 = bn_forward_train(a1, p["bn1.weight"], p["bn1.bias"])
    r1 = np.maximum(b1, 0)
    a2, c2 = conv3x3_forward(r1, p["conv2.weight"], p["conv2.bias"])
    b2, cb2, mu2, var2 = bn_forward_train(a2, p["bn2.weight"], p["bn2.bias"])
    r2 = np.maximum(b2, 0)
    pooled, cp = maxpool2_forward(r2)
    flat = pooled.reshape(n, -1)
    keep = (rng.random(flat.shape) >= DROPOUT).astype(np.float32) / np.float32(1.0 - DROPOUT)
    dropped = flat * keep
    z1 = dropped @ p["fc1.weight"].T + p["fc1.bias"]
    h1 = np.maximum(z1, 0)
    logits = h1 @ p["fc2.weight"].T + p["fc2.bias"]

    shifted = logits - logits.max(axis=1, keepdims=True)
    logp = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    loss = -logp[np.arange(n), y].mean()

    g = {}
    dlogits = np.exp(logp)
    dlogits[np.arange(n), y] -= 1.0
    dlogits /= n
    g["fc2.weight"] = dlogits.T @ h1
    g["fc2.bias"] = dlogits.sum(axis=0)
    dz1 = (dlogits @ p["fc2.weight"]) * (z1 > 0)
    g["fc1.weight"] = dz1.T @ dropped
    g["fc1.bias"] = dz1.sum(axis=0)
    dflat = (dz1 @ p["fc1.weight"]) * keep
    dr2 = maxpool2_backward(dflat.reshape(pooled.shape), cp) * (b2 > 0)
    da2, g["bn2.weight"], g["bn2.bias"] = bn_backward(dr2, cb2)
    dr1, g["conv2.weight"], g["conv2.bias"] = conv3x3_backward(da2, c2)
    dr1 = dr1 * (b1 > 0)
    da1, g["bn1.weight"], g["bn1.bias"] = bn_backward(dr1, cb1)
    _, g["conv1.weight"], g["conv1.bias"] = conv3x3_backward(da1, c1)

    # Running statistics, PyTorch convention (unbiased variance for the running estimate).
    for name, mu, var, m in (("bn1", mu1, var1, a1), ("bn2", mu2, var2, a2)):
        cnt = m.shape[0] * m.shape[2] * m.shape[3]
        buf[f"{name}.running_mean"] = (
            (1 - BN_MOMENTUM) * buf[f"{name}.running_mean"] + BN_MOMENTUM * mu
        ).astype(np.float32)
        buf[f"{name}.running_var"] = (
            (1 - BN_MOMENTUM) * buf[f"{name}.running_var"] + BN_MOMENTUM * var * cnt / (cnt - 1)
        ).astype(np.float32)
    return float(loss), {k: v.astype(np.float32) for k, v in g.items()}


def train(
    x_tr, y_tr, epochs: int, batch_size: int = 32, lr: float = 2e-3, weight_decay: float = 1e-4, log=print
):
    rng = np.random.default_rng(SEED)
    p = init_params(rng)
    buf = init_buffers()
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(val) for k, val in p.items()}
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    t = 0
    steps_per_epoch = int(np.ceil(len(y_tr) / batch_size))
    total = epochs * steps_per_epoch
    for epoch in range(epochs):
        order = rng.permutation(len(y_tr))
        losses = []
        for s in range(steps_per_epoch):
            idx = order[s * batch_size : (s + 1) * batch_size]
            if len(idx) < 2:  # batch norm needs more than one sample
                continue
            loss, g = train_step(p, buf, x_tr[idx], y_tr[idx], rng)
            losses.append(loss)
            t += 1
            step_lr = lr * 0.5 * (1 + np.cos(np.pi * (t - 1) / total))  # cosine decay
            for k in p:
                grad = g[k] + (weight_decay * p[k] if k.endswith("weight") and not k.startswith("bn") else 0)
                m[k] = beta1 * m[k] + (1 - beta1) * grad
                v[k] = beta2 * v[k] + (1 - beta2) * grad * grad
                mhat = m[k] / (1 - beta1**t)
                vhat = v[k] / (1 - beta2**t)
                p[k] = (p[k] - step_lr * mhat / (np.sqrt(vhat) + eps)).astype(np.float32)
        if log and (epoch % 5 == 4 or epoch == epochs - 1):
            acc = float((forward_eval(p, buf, x_tr).argmax(1) == y_tr).mean())
            log(f"epoch {epoch + 1:3d}  loss {np.mean(losses):.4f}  train acc {acc * 100:.2f}%")
    return p, buf


# ----------------------------------------------------------------------------------------------------------
# ONNX export (hand-written, shaped like a torch.onnx.export of the same nn.Module)
# ----------------------------------------------------------------------------------------------------------


def build_onnx(p: dict[str, np.ndarray], buf: dict[str, np.ndarray]) -> onnx.ModelProto:
    def const(name, out, value):
        return helper.make_node("Constant", [], [out], name=name, value=numpy_helper.from_array(value, out))

    nodes = [
        const(
            "/conv1/pad/Constant",
            "/conv1/pad/Constant_output_0",
            np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64),
        ),
        const("/conv1/pad/Constant_1", "/conv1/pad/Constant_1_output_0", np.array(0.0, np.float32)),
        helper.make_node(
            "Pad",
            ["input", "/conv1/pad/Constant_output_0", "/conv1/pad/Constant_1_output_0"],
            ["/conv1/pad/Pad_output_0"],
            name="/conv1/pad/Pad",
            mode="constant",
        ),
        helper.make_node(
            "Conv",
            ["/conv1/pad/Pad_output_0", "conv1.weight", "conv1.bias"],
            ["/conv1/Conv_output_0"],
            name="/conv1/Conv",
            dilations=[1, 1],
            group=1,
            kernel_shape=[3, 3],
            pads=[0, 0, 0, 0],
            strides=[1, 1],
        ),
        helper.make_node(
            "BatchNormalization",
            ["/conv1/Conv_output_0", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var"],
            ["/bn1/BatchNormalization_output_0"],
            name="/bn1/BatchNormalization",
            epsilon=BN_EPS,
            momentum=1.0 - BN_MOMENTUM,
        ),
        helper.make_node(
            "Relu", ["/bn1/BatchNormalization_output_0"], ["/relu1/Relu_output_0"], name="/relu1/Relu"
        ),
        helper.make_node(
            "Conv",
            ["/relu1/Relu_output_0", "conv2.weight", "conv2.bias"],
            ["/conv2/Conv_output_0"],
            name="/conv2/Conv",
            dilations=[1, 1],
            group=1,
            kernel_shape=[3, 3],
            pads=[1, 1, 1, 1],
            strides=[1, 1],
        ),
        helper.make_node(
            "BatchNormalization",
            ["/conv2/Conv_output_0", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var"],
            ["/bn2/BatchNormalization_output_0"],
            name="/bn2/BatchNormalization",
            epsilon=BN_EPS,
            momentum=1.0 - BN_MOMENTUM,
        ),
        helper.make_node(
            "Relu", ["/bn2/BatchNormalization_output_0"], ["/relu2/Relu_output_0"], name="/relu2/Relu"
        ),
        helper.make_node(
            "MaxPool",
            ["/relu2/Relu_output_0"],
            ["/pool/MaxPool_output_0"],
            name="/pool/MaxPool",
            ceil_mode=0,
            kernel_shape=[2, 2],
            pads=[0, 0, 0, 0],
            strides=[2, 2],
        ),
        helper.make_node("Identity", ["/pool/MaxPool_output_0"], ["/Identity_output_0"], name="/Identity"),
        # x.view(x.size(0), -1)
        helper.make_node("Shape", ["/Identity_output_0"], ["/Shape_output_0"], name="/Shape"),
        const("/Constant", "/Constant_output_0", np.array(0, np.int64)),
        helper.make_node(
            "Gather", ["/Shape_output_0", "/Constant_output_0"], ["/Gather_output_0"], name="/Gather", axis=0
        ),
        const("/Constant_1", "/Constant_1_output_0", np.array([0], np.int64)),
        helper.make_node(
            "Unsqueeze",
            ["/Gather_output_0", "/Constant_1_output_0"],
            ["/Unsqueeze_output_0"],
            name="/Unsqueeze",
        ),
        const("/Constant_2", "/Constant_2_output_0", np.array([-1], np.int64)),
        helper.make_node(
            "Concat",
            ["/Unsqueeze_output_0", "/Constant_2_output_0"],
            ["/Concat_output_0"],
            name="/Concat",
            axis=0,
        ),
        helper.make_node(
            "Reshape", ["/Identity_output_0", "/Concat_output_0"], ["/Reshape_output_0"], name="/Reshape"
        ),
        const("/dropout/Constant", "/dropout/Constant_output_0", np.array(DROPOUT, np.float32)),
        helper.make_node(
            "Dropout",
            ["/Reshape_output_0", "/dropout/Constant_output_0"],
            ["/dropout/Dropout_output_0"],
            name="/dropout/Dropout",
        ),
        helper.make_node(
            "Gemm",
            ["/dropout/Dropout_output_0", "fc1.weight", "fc1.bias"],
            ["/fc1/Gemm_output_0"],
            name="/fc1/Gemm",
            alpha=1.0,
            beta=1.0,
            transB=1,
        ),
        helper.make_node("Relu", ["/fc1/Gemm_output_0"], ["/relu3/Relu_output_0"], name="/relu3/Relu"),
        helper.make_node(
            "Gemm",
            ["/relu3/Relu_output_0", "fc2.weight", "fc2.bias"],
            ["logits"],
            name="/fc2/Gemm",
            alpha=1.0,
            beta=1.0,
            transB=1,
        ),
    ]
    init_order = [
        "conv1.weight", "conv1.bias",
        "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
        "conv2.weight", "conv2.bias",
        "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var",
        "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias",
    ]  # fmt: skip
    tensors = {**p, **buf}
    initializers = [
        numpy_helper.from_array(np.ascontiguousarray(tensors[k], np.float32), k) for k in init_order
    ]
    graph = helper.make_graph(
        nodes,
        "main_graph",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["N", 1, 8, 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", OPSET)],
        producer_name="onnxopt-make_digits_cnn",
        producer_version="1",
        doc_string=(
            "Small CNN for sklearn load_digits (8x8, 10 classes), "
            "trained in NumPy by models/make_digits_cnn.py. "
            "Graph written to resemble a PyTorch export (explicit Pad, unfused BatchNormalization, Identity, "
            "Shape-based flatten, inference Dropout) so graph cleanup has work to do. "
            "Input: (pixels/16 - 0.5)/0.5, float32 [N,1,8,8]."
        ),
    )
    model.ir_version = IR_VERSION
    return model


# ----------------------------------------------------------------------------------------------------------
# Deterministic writers
# ----------------------------------------------------------------------------------------------------------


def _npy_bytes(arr: np.ndarray) -> bytes:
    bio = io.BytesIO()
    np.lib.format.write_array(bio, np.ascontiguousarray(arr), allow_pickle=False)
    return bio.getvalue()


def write_npz(path: Path, **arrays: np.ndarray) -> None:
    """Like np.savez (uncompressed, loadable with np.load) but with fixed zip timestamps and entry order."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for key in sorted(arrays):
            info = zipfile.ZipInfo(f"{key}.npy", date_time=ZIP_DATE)
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            info.create_system = 3
            zf.writestr(info, _npy_bytes(arrays[key]))


def write_npy(path: Path, arr: np.ndarray) -> None:
    path.write_bytes(_npy_bytes(arr))


def ort_accuracy(model_bytes: bytes, x: np.ndarray, y: np.ndarray) -> tuple[int, np.ndarray]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(model_bytes, so, providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"input": x})[0]
    return int((logits.argmax(axis=1) == y).sum()), logits


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out-dir", type=Path, default=Path(__file__).resolve().parent)
    ap.add_argument("--epochs", type=int, default=40)
    args = ap.parse_args(argv)
    out: Path = args.out_dir
    out.mkdir(parents=True, exist_ok=True)

    x_tr, y_tr, x_val, y_val, x_calib = load_split()
    print(f"train {x_tr.shape}  val {x_val.shape}  calib {x_calib.shape}")

    t0 = time.perf_counter()
    p, buf = train(x_tr, y_tr, epochs=args.epochs)
    train_s = time.perf_counter() - t0
    np_acc = float((forward_eval(p, buf, x_val).argmax(1) == y_val).mean())
    print(f"trained in {train_s:.1f}s; NumPy val acc {np_acc * 100:.2f}%")

    model = build_onnx(p, buf)
    onnx.checker.check_model(model, full_check=True)
    model_bytes = model.SerializeToString(deterministic=True)
    n_correct, logits = ort_accuracy(model_bytes, x_val, y_val)
    ref = forward_eval(p, buf, x_val)
    max_diff = float(np.abs(ref - logits).max())
    acc = n_correct / len(y_val)
    print(f"ONNX Runtime val acc {acc * 100:.2f}% ({n_correct}/{len(y_val)})", end="; ")
    print(f"max |ORT - NumPy| = {max_diff:.2e}")
    if max_diff > 1e-3:
        raise SystemExit(f"ONNX graph disagrees with the NumPy reference (max diff {max_diff})")

    (out / MODEL_NAME).write_bytes(model_bytes)
    write_npz(out / VAL_NAME, input=x_val)
    write_npy(out / LABELS_NAME, y_val.astype(np.int64))
    write_npz(out / CALIB_NAME, input=x_calib)
    meta = {
        "model": MODEL_NAME,
        "dataset": "sklearn.datasets.load_digits",
        "preprocessing": "x = (pixels / 16 - 0.5) / 0.5, float32, shape [N, 1, 8, 8]",
        "input": {"name": "input", "dtype": "float32", "shape": ["N", 1, 8, 8]},
        "output": {"name": "logits", "dtype": "float32", "shape": ["N", 10]},
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "split": {
            "train": int(len(y_tr)),
            "val": int(len(y_val)),
            "calib": int(len(x_calib)),
            "seed": SPLIT_SEED,
        },
        "train": {"seed": SEED, "epochs": args.epochs, "framework": "numpy"},
        "val_files": {"input": VAL_NAME, "labels": LABELS_NAME},
        "calib_file": CALIB_NAME,
        "val_correct": n_correct,
        "val_total": int(len(y_val)),
        "val_accuracy_percent": round(acc * 100, 2),
    }
    (out / META_NAME).write_text(json.dumps(meta, indent=2) + "\n")
    for name in (MODEL_NAME, VAL_NAME, LABELS_NAME, CALIB_NAME, META_NAME):
        print(f"wrote {out / name} ({(out / name).stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
