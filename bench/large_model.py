"""Large models: wall time and peak memory of onnxopt's presets beside the peers, on one machine, same run.

Builds (once, cached under bench/.cache/large) a model of 12 blocks ``x -> MatMul(W1) -> Relu -> MatMul(W2)
-> Add(b)`` with float32 weights in external data: d=3072 is 0.91 GB of weights, d=5632 (``--large``) 3.05 GB.
Then runs each job in its own process and reads that process's peak RSS from the kernel (``wait4``):

| job | onnxopt | peer |
|---|---|---|
| lossless cleanup | ``optimize -r cleanup`` | onnxslim ``slim()`` |
| int4 weight-only (RTN, blocks of 32, asymmetric) | ``-r int4-weight-only`` | ORT ``MatMulNBitsQuantizer`` |
| dynamic int8 | ``-r int8-dynamic`` | ORT ``quantize_dynamic`` |
| float16 weights | ``-r fp16`` | – |
| static int8 (16 random calibration rows) | ``-r int8 --calib random:16`` | – |

Afterwards every output runs in ONNX Runtime on the same 4 random rows and is compared with the fp32 model
(max and mean absolute error), so a fast tool that broke the model shows it.

    python bench/large_model.py                 # the 0.91 GB model, every job
    python bench/large_model.py --large         # also the 3 GB model through cleanup and int4 (both tools)
    python bench/large_model.py --only cleanup,int4
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CACHE, markdown_table  # noqa: E402

from onnxopt.isa import detect_cpu  # noqa: E402

BLOCKS = 12
SIZES = {"0.91 GB": 3072, "3.05 GB": 5632}


def build(folder: Path, d: int) -> Path:
    """The model, written one weight at a time (building it needs one weight of memory)."""
    path = folder / "model.onnx"
    if path.exists():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "model.onnx.data"
    nodes, inits, x = [], [], "x"

    def external(name: str, array: np.ndarray, f) -> onnx.TensorProto:
        t = onnx.TensorProto(name=name, data_type=TensorProto.FLOAT, dims=array.shape,
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data.name), ("offset", str(f.tell())), ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        f.write(array.tobytes())
        return t

    rng = np.random.default_rng(0)
    with open(data, "wb") as f:
        for i in range(BLOCKS):
            for w in ("w1", "w2"):
                inits.append(external(f"b{i}.{w}", rng.standard_normal((d, d), dtype=np.float32)
                                      * np.float32(1.4 / np.sqrt(d)), f))
            inits.append(external(f"b{i}.bias", rng.standard_normal(d, dtype=np.float32) * np.float32(0.1), f))
            nodes += [helper.make_node("MatMul", [x, f"b{i}.w1"], [f"b{i}.h"], name=f"b{i}/mm1"),
                      helper.make_node("Relu", [f"b{i}.h"], [f"b{i}.r"], name=f"b{i}/relu"),
                      helper.make_node("MatMul", [f"b{i}.r", f"b{i}.w2"], [f"b{i}.m"], name=f"b{i}/mm2"),
                      helper.make_node("Add", [f"b{i}.m", f"b{i}.bias"], [f"b{i}.y"], name=f"b{i}/add")]
            x = f"b{i}.y"
    graph = helper.make_graph(nodes, "blocks", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", d])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", d])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="bench")
    model.ir_version = 8
    path.write_bytes(model.SerializeToString())
    return path


def weight_bytes(path: Path) -> int:
    return (path.parent / "model.onnx.data").stat().st_size


def run_job(cmd: list[str], log: Path) -> tuple[float, float, int]:
    """(wall seconds, peak RSS bytes, exit code) of ``cmd`` in its own process, with an empty cache folder
    (onnxopt caches calibration ranges and placement decisions: a second run would skip the work)."""
    env = {**os.environ, "XDG_CACHE_HOME": str(log.parent / f"{log.name}.cache")}
    with open(log, "w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, usage.ru_maxrss * 1024, proc.returncode


ONNXOPT = [sys.executable, "-c", "from onnxopt.cli import main; main()"]


def peer_script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


def jobs(model: Path, out: Path, only: set[str] | None) -> list[tuple[str, str, str, list[str], Path]]:
    """(job, tool, key, command, output path)."""
    m = str(model)
    table = [
        ("cleanup", "lossless cleanup", "onnxopt -r cleanup",
         [*ONNXOPT, "optimize", m, "-o", str(out / "cleanup.onnx"), "-r", "cleanup", "-q", "--force"],
         out / "cleanup.onnx"),
        ("cleanup", "lossless cleanup", f"onnxslim {_version('onnxslim')}",
         peer_script(f"""
            import onnxslim
            onnxslim.slim({m!r}, {str(out / 'slim.onnx')!r})
         """), out / "slim.onnx"),
        ("int4", "int4 RTN, blocks of 32", "onnxopt -r int4-weight-only",
         [*ONNXOPT, "optimize", m, "-o", str(out / "int4.onnx"), "-r", "int4-weight-only", "-q", "--force"],
         out / "int4.onnx"),
        ("int4", "int4 RTN, blocks of 32", f"ORT {_version('onnxruntime')} MatMulNBitsQuantizer",
         peer_script(f"""
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer
            q = MatMulNBitsQuantizer({m!r}, bits=4, block_size=32, is_symmetric=False)
            q.process()
            q.model.save_model_to_file({str(out / 'ort_int4.onnx')!r}, use_external_data_format=True)
         """), out / "ort_int4.onnx"),
        ("int8-dynamic", "dynamic int8", "onnxopt -r int8-dynamic",
         [*ONNXOPT, "optimize", m, "-o", str(out / "dyn.onnx"), "-r", "int8-dynamic", "-q", "--force"],
         out / "dyn.onnx"),
        ("int8-dynamic", "dynamic int8", f"ORT {_version('onnxruntime')} quantize_dynamic",
         peer_script(f"""
            from onnxruntime.quantization import quantize_dynamic
            quantize_dynamic({m!r}, {str(out / 'ort_dyn.onnx')!r}, use_external_data_format=True)
         """), out / "ort_dyn.onnx"),
        ("fp16", "float16 weights", "onnxopt -r fp16",
         [*ONNXOPT, "optimize", m, "-o", str(out / "fp16.onnx"), "-r", "fp16", "-q", "--force"],
         out / "fp16.onnx"),
        ("int8", "static int8, 16 random rows", "onnxopt -r int8",
         [*ONNXOPT, "optimize", m, "-o", str(out / "int8.onnx"), "-r", "int8", "--calib", "random:16", "-q",
          "--force"], out / "int8.onnx"),
    ]
    return [j for j in table if only is None or j[0] in only]


def _version(package: str) -> str:
    try:
        from importlib.metadata import version

        return version(package)
    except Exception:  # noqa: BLE001 - not installed: the job will fail and say so
        return "?"


def output_bytes(path: Path) -> int:
    if not path.exists():
        return 0
    return sum(p.stat().st_size for p in path.parent.iterdir() if p.name.startswith(path.name))


def errors_vs_fp32(model: Path, outputs: list[Path], d: int) -> dict[Path, tuple[float, float, float]]:
    """(max abs, mean abs, SQNR dB) error of each output against the fp32 model on 4 random rows, one model at
    a time in a child process (so this process never holds two large sessions)."""
    x_path = model.parent / "check_x.npy"
    np.save(x_path, np.random.default_rng(1).standard_normal((4, d), dtype=np.float32))
    script = textwrap.dedent("""
        import sys, numpy as np, onnxruntime as ort
        so = ort.SessionOptions(); so.log_severity_level = 3
        s = ort.InferenceSession(sys.argv[1], so, providers=["CPUExecutionProvider"])
        np.save(sys.argv[3], s.run(None, {s.get_inputs()[0].name: np.load(sys.argv[2])})[0])
    """)
    ref_path = model.parent / "check_ref.npy"
    subprocess.run([sys.executable, "-c", script, str(model), str(x_path), str(ref_path)], check=True)
    ref = np.load(ref_path)
    found = {}
    for p in outputs:
        if not p.exists():
            continue
        got_path = p.parent / f"{p.name}.check.npy"
        r = subprocess.run([sys.executable, "-c", script, str(p), str(x_path), str(got_path)], capture_output=True)
        if r.returncode == 0:
            diff = np.abs(np.load(got_path).astype(np.float64) - ref)
            noise = float(np.sum(diff * diff))
            sqnr = 10 * np.log10(float(np.sum(ref.astype(np.float64) ** 2)) / noise) if noise > 0 else float("inf")
            found[p] = (float(diff.max()), float(diff.mean()), sqnr)
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--large", action="store_true", help="also run cleanup and int4 on the 3.05 GB model")
    ap.add_argument("--only", help="comma-separated jobs: cleanup,int4,int8-dynamic,fp16,int8")
    ap.add_argument("--keep", action="store_true", help="keep the outputs (default: deleted after the checks)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    sizes = list(SIZES.items()) if args.large else list(SIZES.items())[:1]
    rows = []
    for label, d in sizes:
        folder = CACHE / "large" / f"d{d}"
        print(f"building {label} model (d={d}) in {folder} ...", file=sys.stderr, flush=True)
        model = build(folder, d)
        wbytes = weight_bytes(model)
        out = folder / "out"
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir()
        size_only = {"cleanup", "int4"} if label != "0.91 GB" else None
        measured = []
        for _job, what, tool, cmd, path in jobs(model, out, only if size_only is None else (only or size_only)
                                               & size_only):
            print(f"  {label}: {tool} ...", file=sys.stderr, flush=True)
            wall, rss, code = run_job(cmd, out / f"{path.name}.log")
            if code != 0:
                tail = (out / f"{path.name}.log").read_text().strip().splitlines()[-1:] or ["?"]
                print(f"    failed (exit {code}): {tail[0][:200]}", file=sys.stderr)
            measured.append((what, tool, path, wall, rss, code))
        errs = errors_vs_fp32(model, [m[2] for m in measured if m[5] == 0], d)
        peers: dict[str, float] = {}
        for what, tool, _path, wall, _rss, code in measured:
            if not tool.startswith("onnxopt") and code == 0:
                peers[what] = wall
        for what, tool, path, wall, rss, code in measured:
            err = errs.get(path)
            ratio = None
            if tool.startswith("onnxopt") and what in peers and code == 0:
                ratio = f"{wall / peers[what]:.2f}x"
            rows.append([label, what, tool, round(wall, 1) if code == 0 else f"failed ({code})", ratio,
                         f"{rss / 1e9:.2f}", f"{rss / wbytes:.2f}x", f"{output_bytes(path) / 1e9:.3f}",
                         f"{err[0]:.3g}" if err else None, f"{err[1]:.3g}" if err else None,
                         f"{err[2]:.1f}" if err else None])
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)
    print(markdown_table(["model", "job", "tool", "wall s", "time vs peer", "peak RSS GB", "RSS / weights",
                          "output GB", "max abs err vs fp32", "mean abs err", "SQNR dB"], rows))
    cpu = detect_cpu()
    print(f"\nCPU: {platform.processor() or platform.machine()} ({_cpu_model()}), {cpu.describe()}, "
          f"{os.cpu_count()} cores; onnxruntime {_version('onnxruntime')}, onnx_ir {_version('onnx_ir')}, "
          f"onnxslim {_version('onnxslim')}. Each job is one process; peak RSS from wait4 (includes the "
          "interpreter and imports).")


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown CPU"


if __name__ == "__main__":
    main()
