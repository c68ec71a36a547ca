"""Experiment: does BRECQ-style block reconstruction close the gap of the `prune` preset (50 %) on Lite0?

    python bench/prune_block_reconstruction.py                 # 200 calibration images, 650 val
    python bench/prune_block_reconstruction.py --extra-val 325 # val[:325] join the calibration, eval on val[325:]
    python bench/prune_block_reconstruction.py --flip          # reconstruct on the flipped images too

The `prune` preset (OBS re-fit + statistics correction) is the peer, built in the same run. Then every block of
the pruned model (the stretch between two single-tensor cuts holding at least two dense convs: an MBConv) has
its kept weights, its depthwise weights and its biases fitted with Adam so that, fed the pruned model's own
block input (earlier blocks already reconstructed, so errors do not compound), its output matches the float
block's output on the float input -- BRECQ (Li et al. 2021) with the pruning masks fixed instead of rounding.
20 % of the calibration images are held out; a block whose held-out error grows keeps its weights. Forward
and backward are NumPy (Conv incl. depthwise, Clip, Relu, Add); the classifier after the pooling is left to
the preset. The script is not part of the package: it measured a negative result (below) and is kept so the
next attempt starts from a harness, not from scratch.

Measured 2026-12-07, AMD EPYC family 26 (Zen 5: AVX-512 with VNNI, no AMX), 2 cores, onnxruntime 1.32; fp32 80.62 % on val (650):
| model                                | calib | eval      | top-1 | vs fp32 | agree fp32 | agree calib fit/held |
| `prune` preset                       | 200   | val (650) | 78.77 | -1.85   | 90.46      | 91.9 / 92.5          |
| + block reconstruction (200 it x 8)  | 200   | val (650) | 78.46 | -2.15   | 90.00      | 96.3 / 92.5          |
| + the same with horizontal flips     | 200x2 | val (650) | 78.46 | -2.15   | 90.00      |                      |
| `prune` preset                       | 525   | val[325:] | 80.00 | -0.62   | 90.15      |                      |
| + block reconstruction               | 525   | val[325:] | 79.69 | -0.92   | 89.85      |                      |
(the 200-image preset on val[325:]: 78.77, agreement 90.77; block reconstruction of it 80.00, 91.38.)
Block reconstruction lowers every block's held-out output error (block 0: 0.0027 -> 0.0007 relative MSE,
the pre-pool tensor 0.353 -> 0.350) and lifts the agreement on the images it fitted from 92 % to 96 %, but not
on held-out images or val: it over-fits, and 2.6x the calibration data does not change that (agreement with
fp32 stays at 90-91 % for every variant; top-1 moves within the noise, s.d. about 1.2 pt on 650 images).
Fitting only a per-channel scale and bias per conv by the same loss (far fewer parameters; a variant not kept
here): 78.46 %, 90.15 %.
Run time of the reconstruction: 238 and 255 s for 200 images (two runs of this script, both reproducing the
first two rows), 590 s for 525 -- on top of 91-98 s for building the float and pruned models, over the
issue's 5-minute budget.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    IMAGENET,
    cpu_line,
    imagenet_arrays,
    imagenet_val,
    markdown_table,
    need,
    run_batched,
    session,
)

SUPPORTED = ("Conv", "Clip", "Relu", "Add")


def attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


class Conv:
    """NumPy Conv (group 1 through im2col, or depthwise tap by tap) with its vector-Jacobian product."""

    def __init__(self, node: onnx.NodeProto, w: np.ndarray):
        a = attrs(node)
        if a.get("auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
            raise ValueError(f"{node.name}: auto_pad is not supported here")
        self.k, self.strides = tuple(w.shape[2:]), list(a.get("strides", [1, 1]))
        self.dil, self.pads, self.group = list(a.get("dilations", [1, 1])), list(a.get("pads", [0, 0, 0, 0])), a.get("group", 1)
        self.depthwise = self.group > 1
        if self.depthwise and not (self.group == w.shape[0] and w.shape[1] == 1):
            raise ValueError(f"{node.name}: only group 1 and depthwise convs are supported")
        self.pointwise = self.k == (1, 1) and self.strides == [1, 1] and not any(self.pads)

    def _taps(self, ho: int, wo: int):
        (sh, sw), (dh, dw) = self.strides, self.dil
        for i in range(self.k[0]):
            for j in range(self.k[1]):
                yield i, j, (slice(None), slice(None), slice(i * dh, i * dh + sh * (ho - 1) + 1, sh),
                             slice(j * dw, j * dw + sw * (wo - 1) + 1, sw))

    def forward(self, x, w, b):
        p = self.pads
        xp = np.pad(x, ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3]))) if any(p) else x
        ho = (xp.shape[2] - self.dil[0] * (self.k[0] - 1) - 1) // self.strides[0] + 1
        wo = (xp.shape[3] - self.dil[1] * (self.k[1] - 1) - 1) // self.strides[1] + 1
        n, cols = x.shape[0], None
        if self.depthwise:
            y = np.zeros((n, w.shape[0], ho, wo), x.dtype)
            for i, j, s in self._taps(ho, wo):
                y += xp[s] * w[:, 0, i, j][None, :, None, None]
        else:
            if self.pointwise:
                cols = x.reshape(n, x.shape[1], -1)
            else:
                cols = np.empty((n, x.shape[1], *self.k, ho, wo), x.dtype)
                for i, j, s in self._taps(ho, wo):
                    cols[:, :, i, j] = xp[s]
                cols = cols.reshape(n, -1, ho * wo)
            y = np.matmul(w.reshape(w.shape[0], -1), cols).reshape(n, w.shape[0], ho, wo)
        return y + b[None, :, None, None], (x.shape, xp, cols)

    def backward(self, dy, w, cache, need_dx: bool):
        xshape, xp, cols = cache
        n, (ho, wo), p = dy.shape[0], dy.shape[2:], self.pads
        db, dxp = dy.sum(axis=(0, 2, 3)), None
        if self.depthwise:
            dw = np.zeros_like(w)
            dxp = np.zeros_like(xp) if need_dx else None
            for i, j, s in self._taps(ho, wo):
                dw[:, 0, i, j] = np.einsum("nchw,nchw->c", dy, xp[s], optimize=True)
                if need_dx:
                    dxp[s] += dy * w[:, 0, i, j][None, :, None, None]
        else:
            d2 = dy.reshape(n, w.shape[0], -1)
            dw = np.tensordot(d2, cols, axes=([0, 2], [0, 2])).reshape(w.shape)
            if need_dx:
                dcols = np.matmul(w.reshape(w.shape[0], -1).T, d2)
                if self.pointwise:
                    return dcols.reshape(xshape), dw, db
                dcols = dcols.reshape(n, xshape[1], *self.k, ho, wo)
                dxp = np.zeros(xp.shape, xp.dtype)
                for i, j, s in self._taps(ho, wo):
                    dxp[s] += dcols[:, :, i, j]
        dx = dxp[:, :, p[0]:dxp.shape[2] - p[2], p[1]:dxp.shape[3] - p[3]] if need_dx else None
        return dx, dw, db


class Block:
    def __init__(self, nodes: list[onnx.NodeProto], consts: dict[str, np.ndarray]):
        made = {o for nd in nodes for o in nd.output}
        self.nodes, self.consts, self.out = nodes, consts, nodes[-1].output[0]
        self.inp = next(x for nd in nodes for x in nd.input if x not in made and x not in consts)
        self.convs = {nd.name: Conv(nd, consts[nd.input[1]]) for nd in nodes if nd.op_type == "Conv"}

    def _bounds(self, nd):
        lo = float(self.consts[nd.input[1]]) if len(nd.input) > 1 and nd.input[1] else -np.inf
        hi = float(self.consts[nd.input[2]]) if len(nd.input) > 2 and nd.input[2] else np.inf
        return lo, hi

    def forward(self, x, params, keep: bool = False):
        v, caches = {self.inp: x}, {}
        for nd in self.nodes:
            a = v[nd.input[0]]
            if nd.op_type == "Conv":
                y, caches[nd.name] = self.convs[nd.name].forward(a, *params[nd.name])
            elif nd.op_type == "Clip":
                y = np.clip(a, *self._bounds(nd))
            elif nd.op_type == "Relu":
                y = np.maximum(a, 0)
            else:
                y = a + v[nd.input[1]]
            v[nd.output[0]] = y
        return (v, caches) if keep else v[self.out]

    def backward(self, v, caches, dout, params):
        g, grads = {self.out: dout}, {}

        def acc(name, d):
            g[name] = g[name] + d if name in g else d
        for nd in reversed(self.nodes):
            dy = g.pop(nd.output[0], None)
            if dy is None:
                continue
            if nd.op_type == "Conv":
                need_dx = nd.input[0] != self.inp
                dx, dw, db = self.convs[nd.name].backward(dy, params[nd.name][0], caches[nd.name], need_dx)
                grads[nd.name] = [dw, db]
                if need_dx:
                    acc(nd.input[0], dx)
            elif nd.op_type == "Clip":
                lo, hi = self._bounds(nd)
                x = v[nd.input[0]]
                acc(nd.input[0], dy * ((x > lo) & (x < hi)))
            elif nd.op_type == "Relu":
                acc(nd.input[0], dy * (v[nd.input[0]] > 0))
            else:
                acc(nd.input[0], dy)
                acc(nd.input[1], dy)
        return grads


def constants(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    out = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    out.update({nd.output[0]: numpy_helper.to_array(nd.attribute[0].t) for nd in model.graph.node
                if nd.op_type == "Constant"})
    return out


def blocks_of(model: onnx.ModelProto, consts: dict[str, np.ndarray]) -> list[list[onnx.NodeProto]]:
    """The supported prefix of the graph cut at tensors that alone are live, >= 2 dense convs per block."""
    region = []
    for nd in (n for n in model.graph.node if n.op_type != "Constant"):
        if nd.op_type not in SUPPORTED:
            break
        region.append(nd)
    last_use = {}
    for i, nd in enumerate(region):
        for x in nd.input:
            last_use[x] = i
    blocks, cur, dense = [], [], 0
    made = {x for nd in region for x in nd.input if x not in consts} - {o for nd in region for o in nd.output}
    for i, nd in enumerate(region):
        cur.append(nd)
        made.update(nd.output)
        dense += nd.op_type == "Conv" and attrs(nd).get("group", 1) == 1
        live = {x for x in made if last_use.get(x, -1) > i}
        if len(live) == 1 and dense >= 2:
            blocks.append(cur)
            cur, dense = [], 0
    return blocks + ([cur] if cur else [])


def run(block: Block, params, data: np.ndarray) -> np.ndarray:
    return np.concatenate([block.forward(data[i:i + 16], params) for i in range(0, len(data), 16)])


def rel_error(block: Block, params, x: np.ndarray, target: np.ndarray) -> float:
    return float(np.sum((run(block, params, x) - target) ** 2) / np.sum(target ** 2))


def reconstruct(ref: onnx.ModelProto, pruned: onnx.ModelProto, x: np.ndarray, *, iters: int, batch: int,
                lr: float, seed: int = 0) -> dict[str, list]:
    rc, pc = constants(ref), constants(pruned)
    pnodes = {nd.name: nd for nd in pruned.graph.node}
    rng = np.random.default_rng(seed)
    perm = rng.permutation(len(x))
    fit, held = perm[:int(0.8 * len(x))], perm[int(0.8 * len(x)):]
    xf = xq = x
    fitted = {}

    for bi, nodes in enumerate(blocks_of(ref, rc)):
        start, block = time.perf_counter(), Block(nodes, rc)
        convs = [nd for nd in nodes if nd.op_type == "Conv"]
        pf = {nd.name: [rc[nd.input[1]].astype(np.float32), rc[nd.input[2]].astype(np.float32)] for nd in convs}
        p = {nd.name: [pc[pnodes[nd.name].input[k]].astype(np.float32).copy() for k in (1, 2)] for nd in convs}
        masks = {k: (v[0] != 0) if not block.convs[k].depthwise else np.ones(v[0].shape, bool) for k, v in p.items()}
        yf = run(block, pf, xf)
        before, p0 = rel_error(block, p, xq[held], yf[held]), {k: [a.copy() for a in v] for k, v in p.items()}
        m1 = {k: [np.zeros_like(a) for a in v] for k, v in p.items()}
        m2 = {k: [np.zeros_like(a) for a in v] for k, v in p.items()}
        # Adam's step is about lr per entry: scale it to each tensor's own magnitude
        steps = {k: lr * float(np.sqrt(np.mean(v[0][masks[k]] ** 2))) for k, v in p.items()}
        for it in range(iters):
            j = rng.choice(fit, batch, replace=False)
            v, caches = block.forward(xq[j], p, keep=True)
            y = v[block.out]
            dout = ((2.0 / y.size) * (y - yf[j]) / max(float(np.mean(yf[j] ** 2)), 1e-12)).astype(np.float32)
            decay = 1.0 if it < 0.7 * iters else 0.3
            for k, (dw, db) in block.backward(v, caches, dout, p).items():
                for a, grad in ((0, dw * masks[k]), (1, db)):
                    m1[k][a] = 0.9 * m1[k][a] + 0.1 * grad
                    m2[k][a] = 0.999 * m2[k][a] + 0.001 * grad * grad
                    mh, vh = m1[k][a] / (1 - 0.9 ** (it + 1)), m2[k][a] / (1 - 0.999 ** (it + 1))
                    p[k][a] = p[k][a] - steps[k] * decay * mh / (np.sqrt(vh) + 1e-8 * np.sqrt(vh).mean() + 1e-12)
                p[k][0] *= masks[k]
        after = rel_error(block, p, xq[held], yf[held])
        if after >= before:
            p = p0
        print(f"  block {bi} -> {block.out}: held-out rel. error {before:.5f} -> {after:.5f} "
              f"{'kept' if after < before else 'reverted'} ({time.perf_counter() - start:.1f} s)", file=sys.stderr)
        fitted.update(p)
        xq, xf = run(block, p, xq), yf
    return fitted


def write_params(pruned: onnx.ModelProto, params: dict[str, list], out: Path) -> None:
    model = onnx.ModelProto()
    model.CopyFrom(pruned)
    inits = {t.name: t for t in model.graph.initializer}
    for nd in model.graph.node:
        for name, arr in zip(nd.input[1:3], params.get(nd.name, []), strict=False):
            inits[name].CopyFrom(numpy_helper.from_array(arr.astype(np.float32), name))
    onnx.save(model, out)


def main() -> None:
    from onnxopt.optimize import optimize
    from onnxopt.recipe import load_recipe

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--extra-val", type=int, default=0, help="move val[:K] into the calibration data, eval on val[K:]")
    ap.add_argument("--flip", action="store_true", help="also reconstruct on the horizontally flipped images")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    src = need(IMAGENET / "efficientnet_lite0.onnx")
    xv, yv = imagenet_val()
    xc = np.concatenate([imagenet_arrays(IMAGENET / "calib"), xv[:args.extra_val]])
    xv, yv = xv[args.extra_val:], yv[args.extra_val:]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        np.savez(work / "calib.npz", input=xc)
        preset = load_recipe("prune")
        dense = preset.model_copy(update={"passes": [p for p in preset.passes if p.type != "prune-weights"]})
        t0 = time.perf_counter()
        for recipe, name in ((dense, "float"), (preset, "pruned")):
            optimize(src, work / f"{name}.onnx", recipe=recipe, calib=work / "calib.npz", force=True)
        t_prune = time.perf_counter() - t0
        ref, pruned = onnx.load(work / "float.onnx"), onnx.load(work / "pruned.onnx")
        t0 = time.perf_counter()
        xr = np.concatenate([xc, xc[..., ::-1]]) if args.flip else xc
        params = reconstruct(ref, pruned, xr.astype(np.float32), iters=args.iters, batch=args.batch, lr=args.lr)
        t_rec = time.perf_counter() - t0
        write_params(pruned, params, work / "recon.onnx")
        scores = {k: run_batched(session(work / f"{k}.onnx", threads=2), xv).argmax(1)
                  for k in ("float", "pruned", "recon")}
    rows = [[name, f"{np.mean(scores[k] == yv) * 100:.2f}", f"{(np.mean(scores[k] == yv) - np.mean(scores['float'] == yv)) * 100:+.2f}",
             f"{np.mean(scores[k] == scores['float']) * 100:.2f}", f"{t:.0f}"]
            for name, k, t in (("fp32", "float", 0), ("`prune` preset (peer)", "pruned", t_prune),
                               ("+ block reconstruction", "recon", t_rec))]
    print(f"EfficientNet-Lite0 50 % pruned, {len(xc)} calibration images, {len(yv)} val images; {cpu_line()}")
    print(markdown_table(["model", "top-1 %", "vs fp32 (pt)", "agree fp32 %", "build s"], rows))


if __name__ == "__main__":
    main()
