"""Activations of a model on calibration data, and statistics streamed from them.

The one place where data-aware passes (calibration, pruning, low-rank, statistics correction, error
localization, accuracy recovery) run a model with intermediate values exposed: ``exposed`` makes a
structural copy of the model whose outputs are the wanted values (weights shared, nothing copied),
``activation_session`` hands it to ONNX Runtime (by path when the weights are large), and the statistics
(``collect_grams``: per-layer input Gram matrices and means) are accumulated batch by batch, so memory
does not grow with the number of samples.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxopt.data import first, samples_in, subset
from onnxopt.errors import OnnxoptError
from onnxopt.graph import ancestors, clone_model, values_by_name
from onnxopt.model_io import as_ir
from onnxopt.runtime import make_session, run_batch

GRAM_CHUNK = 8192  # rows per float32 product before adding into the float64 Gram matrix


def exposed(model: ir.Model | onnx.ModelProto, names: Iterable[str], *, keep_outputs: bool = True,
            prune: bool = False) -> ir.Model:
    """A structural copy of ``model`` (tensors shared) whose graph outputs also include the values ``names``.

    ``keep_outputs=False``: the outputs are exactly ``names``. ``prune=True``: only the nodes those outputs
    depend on are kept (a prefix of the model: cheaper to run when the values sit early in the graph).
    Unknown names raise ``OnnxoptError``.
    """
    work = clone_model(as_ir(model))
    graph = work.graph
    by_name = values_by_name(graph)
    wanted = list(dict.fromkeys(names))
    missing = [n for n in wanted if n not in by_name]
    if missing:
        raise OnnxoptError(f"the model has no value(s) {', '.join(map(repr, missing[:5]))}")
    outputs = list(graph.outputs) if keep_outputs else []
    have = {id(v) for v in outputs}
    for name in wanted:
        v = by_name[name]
        if id(v) not in have:
            outputs.append(v)
            have.add(id(v))
    graph.outputs.clear()
    graph.outputs.extend(outputs)
    if prune:
        live = ancestors(graph, outputs)
        dead = [n for n in graph if n not in live]
        for n in dead:  # detach first: a dead node may read another dead node's output
            for i in range(len(n.inputs)):
                n.replace_input_with(i, None)
        graph.remove(dead)
        used = {id(x) for n in graph for x in n.inputs if x is not None} | have
        for name in [k for k, v in graph.initializers.items() if id(v) not in used and not v.is_graph_input()]:
            del graph.initializers[name]
    return work


FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.DOUBLE})
_RANDOM_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                         "Multinomial"})


def value_types(model: ir.Model | onnx.ModelProto) -> dict[str, ir.DataType]:
    """Element type of every value of the main graph whose type is known: declared, else from (non-strict)
    shape inference on the skeleton."""
    from onnxopt.checks import infer

    model = as_ir(model)
    g = model.graph
    out: dict[str, ir.DataType] = {}
    for v in [*g.inputs, *g.outputs, *(o for n in g for o in n.outputs)]:
        if v.name and v.dtype is not None and v.dtype != ir.DataType.UNDEFINED:
            out.setdefault(v.name, v.dtype)
    try:
        inferred = infer(model, strict=False).graph
    except Exception:  # noqa: BLE001 - inference is a help here, not a requirement
        return out
    for vi in [*inferred.input, *inferred.output, *inferred.value_info]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            out.setdefault(vi.name, ir.DataType(vi.type.tensor_type.elem_type))
    return out


def constant_values(graph: ir.Graph) -> set[str]:
    """Names of initializers and of everything computed from them alone (Constant nodes, shape arithmetic
    on constants): values that are the same for every input."""
    const = {name for name, v in graph.initializers.items() if not v.is_graph_input()}
    for node in graph:
        if node.op_type in _RANDOM_OPS or any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
                                              for a in node.attributes.values()):
            continue
        inputs = [x for x in node.inputs if x is not None]
        if (not inputs and node.op_type == "Constant") or (inputs and all(x.name in const for x in inputs)):
            const.update(o.name for o in node.outputs if o.name)
    return const


_SHAPE_OPS = frozenset({"Shape", "Size"})
_GATHER_OPS = frozenset({"Gather", "GatherElements", "GatherND"})
# ops a masked score passes through on its way to the Softmax (Where: masked_fill written as Where)
_MASK_PATH_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Max", "Min", "Cast", "Reshape", "Transpose",
                            "Unsqueeze", "Squeeze", "Expand", "Identity"})


def attention_masks(model: ir.Model | onnx.ModelProto) -> set[str]:
    """Values that are additive attention masks or scores with such a mask applied: they hold -inf (or -1e4,
    or the float minimum) where a position is masked, so no clip range describes them and quantizing them
    would let masked positions into the Softmax. Calibration skips them; QDQ insertion leaves them float.

    A mask is a float value computed without reading any float input or embedding lookup other than through
    Shape/Size (from integer inputs such as ``attention_mask``, from shapes, e.g. a causal mask, and
    constants), that an
    Add/Sub/Where combines with a data value on a path of elementwise and layout ops ending in a Softmax. The
    returned names are the masks and the values on that path (the Softmax output is an ordinary activation).
    """
    model = as_ir(model)
    g = model.graph
    types = value_types(model)
    const = constant_values(g)
    # data: float inputs and embedding lookups (a float table indexed by token ids), and what reads them
    data: set[str] = {i.name for i in g.inputs if types.get(i.name) in FLOAT_TYPES}
    for n in g:
        lookup = (n.op_type in _GATHER_OPS and n.inputs[0] is not None and n.inputs[0].name in const
                  and types.get(n.inputs[0].name) in FLOAT_TYPES)
        if lookup or (n.op_type not in _SHAPE_OPS and any(x is not None and x.name in data for x in n.inputs)):
            data.update(o.name for o in n.outputs if o.name)

    def is_mask(v) -> bool:
        return (v is not None and v.name not in data and v.name not in const
                and types.get(v.name) in FLOAT_TYPES)

    out: set[str] = set()
    for n in g:
        if n.op_type not in ("Add", "Sub", "Where"):
            continue
        masks = [x for x in n.inputs if is_mask(x)]
        if not masks or not any(x is not None and x.name in data for x in n.inputs):
            continue
        path, frontier, reaches = [], [n], False
        while frontier and not reaches and len(path) < 16:
            node = frontier.pop()
            path.extend(o.name for o in node.outputs if o.name)
            for use in {id(u): u for o in node.outputs for u, _ in o.uses()}.values():
                if use.op_type == "Softmax":
                    reaches = True
                elif use.op_type in _MASK_PATH_OPS:
                    frontier.append(use)
        if reaches:
            out.update(path)
            stack = list(masks)  # and the float values the mask is built from (-inf may appear upstream)
            while stack:
                v = stack.pop()
                if v.name in out:
                    continue
                out.add(v.name)
                p = v.producer()
                if p is not None and p.op_type not in _SHAPE_OPS:
                    stack.extend(x for x in p.inputs if is_mask(x))
    return out


def has_attention(model: ir.Model | onnx.ModelProto) -> bool:
    """Whether the main graph holds attention: a Softmax whose output reaches a MatMul (probabilities times
    values) through layout ops. Such models carry the transformer residual stream, whose few huge-magnitude
    channels no int8 activation range of an Add/Mul on it can hold."""
    g = as_ir(model).graph
    for n in g:
        if n.op_type != "Softmax":
            continue
        frontier, seen = [n], 0
        while frontier and seen < 16:
            node = frontier.pop()
            seen += 1
            for use in {id(u): u for o in node.outputs for u, _ in o.uses()}.values():
                if use.op_type == "MatMul":
                    return True
                if use.op_type in _MASK_PATH_OPS:
                    frontier.append(use)
    return False


def select_tensors(model: ir.Model | onnx.ModelProto, names: list[str] | None = None,
                   what: str = "calibrate") -> list[str]:
    """Activations to observe, in graph order: the float graph inputs and float node outputs that are not
    constants (``names=None``), or ``names`` after checking each is an input or a node output.

    Values whose type is unknown even after shape inference are included; callers drop those that turn
    out not to be float when the model runs.
    """
    model = as_ir(model)
    g = model.graph
    produced = [o.name for n in g for o in n.outputs if o.name]
    inputs = [i.name for i in g.inputs if not i.is_initializer()]
    if names is not None:
        known = set(inputs) | set(produced)
        for name in names:
            if name in g.initializers:
                raise OnnxoptError(f"{what}: tensor {name!r} is an initializer (a constant), not an activation")
            if name not in known:
                import difflib

                close = difflib.get_close_matches(name, sorted(known), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise OnnxoptError(f"{what}: no tensor {name!r} in the model{hint}")
        return list(dict.fromkeys(names))
    types = value_types(model)
    const = constant_values(g)
    seen: dict[str, None] = {}
    for name in inputs + produced:
        t = types.get(name)
        if name not in const and (t is None or t in FLOAT_TYPES):
            seen.setdefault(name)
    return list(seen)


def activation_session(model: ir.Model | onnx.ModelProto, names: Iterable[str], *, opt_level: str = "basic",
                       threads: int | None = None, what: str = "model", prune: bool = False,
                       keep_outputs: bool = True):
    """An ONNX Runtime session of ``model`` with ``names`` exposed as outputs (see ``exposed``)."""
    return make_session(exposed(model, names, prune=prune, keep_outputs=keep_outputs), opt_level=opt_level,
                        threads=threads, what=what)


def limited_batches(source, batch_size: int, max_samples: int | None) -> Iterator[dict[str, np.ndarray]]:
    """``source.batches(batch_size)``, stopping after ``max_samples`` samples (last batch cut)."""
    left = max_samples
    for batch in source.batches(batch_size):
        n = samples_in(batch)
        if left is not None:
            if left <= 0:
                return
            if n > left:
                batch = first(batch, left)
                n = left
            left -= n
        yield batch


def sample_batches(model: ir.Model | onnx.ModelProto, source, n: int) -> list[dict[str, np.ndarray]]:
    """About ``n`` samples of ``source`` as batches the model can run: none larger than its static batch
    dim; with the feeds layout, whole feeds."""
    from onnxopt.data import model_inputs

    limit = min([s.static_batch for s in model_inputs(model) if s.static_batch] or [n])
    out, got = [], 0
    for b in source.batches(min(n, limit)):
        k = min(samples_in(b), n - got)
        out.append(first(b, k))
        got += k
        if got >= n:
            break
    return out


def output_sqnr(reference: list[list[np.ndarray]], candidate: list[list[np.ndarray]]) -> float:
    """SQNR (dB) of the candidate's outputs against the reference's, over every output of every batch
    together (lists of per-batch output lists, same order); inf when they are equal."""
    signal = noise = 0.0
    for ref, out in zip(reference, candidate, strict=True):
        for r, o in zip(ref, out, strict=True):
            r64, o64 = np.asarray(r, np.float64), np.asarray(o, np.float64)
            signal += float(np.sum(r64 * r64))
            noise += float(np.sum((r64 - o64) ** 2))
    if noise == 0:
        return float("inf")
    return 10 * float(np.log10(max(signal, 1e-30) / noise))


def stream_activations(model: ir.Model | onnx.ModelProto, source, names: list[str], *, batch_size: int,
                       max_samples: int | None = None, opt_level: str = "basic", what: str = "model",
                       prune: bool = False, keep_outputs: bool = True,
                       ) -> Iterator[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run ``model`` over ``source`` and yield (batch, {name: value}) per batch; graph inputs among ``names``
    come from the batch itself. Nothing is kept between batches. ``prune``/``keep_outputs``: see ``exposed``
    (both together run only the prefix of the model that ``names`` need)."""
    model = as_ir(model)
    graph_inputs = {i.name for i in model.graph.inputs}
    fetch = [n for n in dict.fromkeys(names) if n not in graph_inputs]
    session = (activation_session(model, fetch, opt_level=opt_level, what=what, prune=prune,
                                  keep_outputs=keep_outputs) if fetch else None)
    feed_names = {i.name for i in session.get_inputs()} if session is not None else set()
    done = 0
    for batch in limited_batches(source, batch_size, max_samples):
        feed = subset(batch, feed_names)
        values = run_batch(session, feed, fetch, first_sample=done) if session is not None else {}
        for n in names:
            if n in graph_inputs:
                values[n] = batch[n]
        done += samples_in(batch)
        yield batch, values


def stream_paired(reference: ir.Model | onnx.ModelProto, candidate: ir.Model | onnx.ModelProto, source,
                  reference_names: list[str], candidate_names: list[str], *, batch_size: int,
                  max_samples: int | None = None, what: str = "model", opt_level: str = "basic",
                  ) -> Iterator[tuple[int, dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Run two models (e.g. the float model and its quantized version) on the same batches and yield
    (samples, {name: value} of ``reference``, {name: value} of ``candidate``) per batch: what a layer sees
    or gives in each, for statistics pairing them row by row (accuracy recovery). Nothing is kept between
    batches; each model runs only the prefix its names need."""
    ref_it = stream_activations(reference, source, reference_names, batch_size=batch_size, max_samples=max_samples,
                                what=f"{what} (reference)", prune=True, keep_outputs=False, opt_level=opt_level)
    cand_it = stream_activations(candidate, source, candidate_names, batch_size=batch_size,
                                 max_samples=max_samples, what=f"{what} (candidate)", prune=True, keep_outputs=False,
                                 opt_level=opt_level)
    for (batch, ref), (_, cand) in zip(ref_it, cand_it, strict=True):
        yield samples_in(batch), ref, cand


# --------------------------------------------------------------------------------------------
# Streaming Gram matrices of layer inputs
# --------------------------------------------------------------------------------------------
def single_threaded_blas():
    """A context limiting BLAS/LAPACK to one thread when ``threadpoolctl`` is installed (else a no-op).

    The eigenproblems here are small (at most a few thousand); multi-threaded LAPACK gains little on
    them and loses up to 10x on a busy machine, where OpenBLAS threads spin waiting for a core."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return nullcontext()
    return threadpool_limits(1)


@dataclass
class GramRequest:
    """Accumulate ``R^T R`` over the rows ``R = rows(x)`` of activation ``tensor``."""

    tensor: str
    dim: int
    rows: Any  # callable: np.ndarray -> 2-D array [n, dim]


@dataclass
class InputStats:
    """First and second moments of a layer's input rows: ``gram = E[x^T x]`` (K x K), ``mean = E[x]``."""

    gram: np.ndarray
    mean: np.ndarray
    rows: int
    # squared Frobenius variance of ``gram`` as an estimate (Ledoit-Wolf's beta^2), from the spread of the
    # per-batch Gram matrices: rows of one sample (tokens, pixels) are not independent, batches are
    noise: float = 0.0

    @property
    def covariance(self) -> np.ndarray:
        return self.gram - np.outer(self.mean, self.mean)

    def shrinkage(self, c: np.ndarray) -> float:
        """Ledoit-Wolf intensity for ``c`` (the Gram or covariance estimated here): how far to pull it towards
        a multiple of the identity, given how much it varies between calibration batches (0: not at all)."""
        p = len(c)
        m = float(np.trace(c)) / p
        d2 = float(np.sum(c * c)) - 2 * m * float(np.trace(c)) + m * m * p  # ||C - m I||_F^2
        if d2 <= 0:
            return 0.0
        return min(self.noise, d2) / d2


def collect_grams(model: ir.Model | onnx.ModelProto, source, requests: dict[Any, GramRequest], *, batch_size: int,
                  max_samples: int | None, progress, what: str) -> tuple[dict[Any, InputStats], int]:
    """Run ``model`` over ``source`` once; return ({key: InputStats}, samples). Activations are dropped
    after each batch; only the float64 moments are kept."""
    model = as_ir(model)
    graph_inputs = {i.name for i in model.graph.inputs}
    tensors = list(dict.fromkeys(r.tensor for r in requests.values()))
    fetch = [t for t in tensors if t not in graph_inputs]
    session = activation_session(model, fetch, opt_level="basic", what=f"model ({what} calibration)")
    feed_names = {i.name for i in session.get_inputs()}
    grams = {k: np.zeros((r.dim, r.dim)) for k, r in requests.items()}
    sums = {k: np.zeros(r.dim) for k, r in requests.items()}
    # for the estimation noise: sum over batches of ||S_b||^2 and n_b S_b and n_b^2 (S_b: batch Gram sum);
    # a single batch falls back to single rows as the observations (sum of ||x||^4)
    sq = dict.fromkeys(requests, 0.0)
    weighted = {k: np.zeros((r.dim, r.dim)) for k, r in requests.items()}
    n2 = dict.fromkeys(requests, 0.0)
    fourth = dict.fromkeys(requests, 0.0)
    counts = dict.fromkeys(requests, 0)

    def accumulate(key, x):
        rows = requests[key].rows(x)
        if rows.shape[1] != requests[key].dim:
            raise OnnxoptError(f"{what}: activation {requests[key].tensor!r} has {rows.shape[1]} features, "
                               f"expected {requests[key].dim}")
        # one batch in float32 (float64 if that is the activations' type), the running sum in float64
        rows = np.ascontiguousarray(rows, dtype=np.float64 if rows.dtype == np.float64 else np.float32)
        batch = np.zeros_like(grams[key])
        for start in range(0, rows.shape[0], GRAM_CHUNK):
            part = rows[start:start + GRAM_CHUNK]
            batch += part.T @ part
        n = rows.shape[0]
        grams[key] += batch
        sq[key] += float(np.sum(batch * batch))
        weighted[key] += n * batch
        n2[key] += float(n) * n
        sums[key] += rows.sum(axis=0, dtype=np.float64)
        fourth[key] += float(np.sum(np.square(np.einsum("ij,ij->i", rows, rows, dtype=np.float64))))
        counts[key] += n

    done = 0
    total = len(source) if max_samples is None else min(len(source), max_samples)
    with single_threaded_blas(), ThreadPoolExecutor(2) as pool, \
            progress.task(f"{what}: input statistics", total) as bar:
        for batch in limited_batches(source, batch_size, max_samples):
            feed = subset(batch, feed_names)
            values = run_batch(session, feed, fetch, first_sample=done) if fetch else {}
            for t in tensors:
                if t in graph_inputs:
                    values[t] = batch[t]
            jobs = [pool.submit(accumulate, key, values[r.tensor]) for key, r in requests.items()]
            for j in jobs:
                j.result()
            n = samples_in(batch)
            done += n
            bar.update(n)
            del values, feed, batch
    if done == 0:
        raise OnnxoptError(f"{what}: no calibration samples in {source.description}")
    out = {}
    for k, g in grams.items():
        n = max(counts[k], 1)
        gram = g / n
        if n2[k] < float(n) * n:  # several batches: Var(G) ~ sum_b (n_b/n)^2 ||G_b - G||^2
            noise = (sq[k] - 2 * float(np.sum(weighted[k] * gram)) + n2[k] * float(np.sum(gram * gram))) / (n * n)
        else:  # one batch: its rows as the observations
            noise = (fourth[k] / n - float(np.sum(gram * gram))) / n
        out[k] = InputStats(gram, sums[k] / n, counts[k], max(noise, 0.0))
    return out, done
