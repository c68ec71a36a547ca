"""Every malformed input through every CLI command that accepts it: exit 2, one 'error:' line naming the
problem, no traceback, nothing written, inputs unchanged. Plus the cases that must *succeed* (unsorted
nodes), output-path problems, and proof that external data outside the model's folder is never opened."""

from __future__ import annotations

import builtins
import io
import os
import pathlib
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from clihelp import assert_refused, cli
from corpus import ALL_CASES, LABELS, MODEL, VAL, expand, file_hashes, listing, tiny

import onnxopt.model_io

PARAMS = [pytest.param(case, run_id, id=f"{case.id}[{run_id}]") for case in ALL_CASES for run_id in case.runs]


def test_corpus_is_big_and_ids_are_distinct():
    ids = [c.id for c in ALL_CASES]
    assert len(ids) == len(set(ids))
    assert len(ids) >= 50


@pytest.mark.parametrize("case, run_id", PARAMS)
def test_malformed_input_is_refused_in_one_line(tmp_path, case, run_id):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    bad = case.build(src)
    before, files_before = file_hashes(src, MODEL, VAL, LABELS), listing(src)
    code, _, err = cli(*expand(case.runs[run_id], bad=bad, out=out / "o.onnx", rep=out / "rep"))
    assert_refused(code, err, case.message)
    assert listing(out) == []  # no model, no report, no temporary file
    assert listing(src) == files_before
    assert file_hashes(src, MODEL, VAL, LABELS) == before


@pytest.mark.parametrize("case_id, run_id", [("empty-file", "optimize"), ("cycle", "validate-candidate"),
                                             ("data-nan", "validate-data"), ("recipe-yaml-list", "optimize-recipe"),
                                             ("external-dotdot", "inspect")])
def test_end_to_end_in_a_separate_process(tmp_path, case_id, run_id):
    case = next(c for c in ALL_CASES if c.id == case_id)
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    bad = case.build(src)
    before = file_hashes(src)
    argv = expand(case.runs[run_id], bad=bad, out=out / "o.onnx", rep=out / "rep")
    proc = subprocess.run([sys.executable, "-m", "onnxopt.cli", *argv], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "ONNXOPT_DEBUG": ""})
    assert_refused(proc.returncode, proc.stderr, case.message)
    assert proc.stdout == ""
    assert listing(out) == [] and file_hashes(src) == before


# --------------------------------------------------------------------------------------------
# Unsorted nodes are sorted, not refused
# --------------------------------------------------------------------------------------------
def _ort(model_or_path, x):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    data = model_or_path.SerializeToString() if isinstance(model_or_path, onnx.ModelProto) else str(model_or_path)
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


@pytest.mark.parametrize("which", ["bundled", "tiny"])
def test_unsorted_nodes_are_sorted_and_run(tmp_path, which):
    model = onnx.load(MODEL) if which == "bundled" else tiny()
    nodes = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(reversed(nodes))
    unsorted = tmp_path / "unsorted.onnx"
    unsorted.write_bytes(model.SerializeToString())
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(model)  # it really is out of order
    reference = MODEL if which == "bundled" else tmp_path / "sorted.onnx"
    if which == "tiny":
        reference.write_bytes(tiny().SerializeToString())
    before = file_hashes(unsorted)

    out = tmp_path / "out.onnx"
    code, _, err = cli("optimize", unsorted, "-o", out, "--val", VAL, "--max-abs-error", "1e-4", "-q")
    assert code == 0, err
    assert "sorted" in err and "error:" not in err
    x = np.load(VAL)["input"][:64]
    np.testing.assert_allclose(_ort(out, x), _ort(reference, x), rtol=1e-5, atol=1e-5)
    for args in (["validate", unsorted, reference], ["validate", reference, unsorted]):
        code, _, err = cli(*args, "--data", VAL, "--max-abs-error", "1e-5", "-q")
        assert code == 0, err
    code, stdout, _ = cli("inspect", unsorted)
    assert code == 0 and "input  input: float32 [N, 1, 8, 8]" in stdout
    assert file_hashes(unsorted) == before


# --------------------------------------------------------------------------------------------
# Output paths
# --------------------------------------------------------------------------------------------
def _refused_without_output(tmp_path, args, message, *, keep=()):
    before = file_hashes(MODEL)
    code, _, err = cli(*args)
    assert_refused(code, err, message)
    assert file_hashes(MODEL) == before
    left = [p for p in listing(tmp_path) if p not in keep]
    assert left == [], left


def test_output_is_a_directory(tmp_path):
    (tmp_path / "o.onnx").mkdir()
    _refused_without_output(tmp_path, ["optimize", MODEL, "-o", tmp_path / "o.onnx", "-q"], r"o\.onnx' is a directory",
                            keep=["o.onnx"])
    assert (tmp_path / "o.onnx").is_dir() and not any((tmp_path / "o.onnx").iterdir())


def test_existing_output_without_force_is_untouched(tmp_path):
    (tmp_path / "o.onnx").write_bytes(b"previous")
    _refused_without_output(tmp_path, ["optimize", MODEL, "-o", tmp_path / "o.onnx", "-q"],
                            r"output exists; pass --force to overwrite", keep=["o.onnx"])
    assert (tmp_path / "o.onnx").read_bytes() == b"previous"


def test_output_under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    _refused_without_output(tmp_path, ["optimize", MODEL, "-o", tmp_path / "file.txt" / "o.onnx", "-q"],
                            r"cannot write the output there", keep=["file.txt"])


def test_output_is_the_input(tmp_path):
    _refused_without_output(tmp_path, ["optimize", MODEL, "-o", MODEL, "--force", "-q"], "would overwrite the input")


def test_unwritable_output_folder(tmp_path, monkeypatch):
    # Running as root makes chmod meaningless, so the permission check is told the folder is read-only.
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: False if pathlib.Path(p) == folder and mode & os.W_OK
                        else real_access(p, mode, **k))
    try:
        _refused_without_output(tmp_path, ["optimize", MODEL, "-o", folder / "o.onnx", "-q"],
                                r"ro: cannot write the output there", keep=["ro"])
    finally:
        folder.chmod(0o755)
    assert not any(folder.iterdir())


def test_write_refused_by_the_filesystem(tmp_path, monkeypatch):
    """The folder looks writable but the OS says no when the model is written (EACCES)."""
    def denied(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(onnxopt.model_io.tempfile, "mkdtemp", denied)
    _refused_without_output(tmp_path, ["optimize", MODEL, "-o", tmp_path / "o.onnx", "-q"],
                            r"o\.onnx: cannot write output \(Permission denied\)")


def test_report_path_is_a_file(tmp_path):
    (tmp_path / "rep").write_text("not a folder")
    _refused_without_output(tmp_path, ["optimize", MODEL, "-o", tmp_path / "o.onnx", "--report", tmp_path / "rep",
                                       "-q"], r"rep' is a file", keep=["rep"])
    _refused_without_output(tmp_path, ["validate", MODEL, MODEL, "--data", VAL, "--report", tmp_path / "rep", "-q"],
                            r"rep' is a file", keep=["rep"])


def test_report_path_is_a_file_through_the_api(tmp_path):
    from onnxopt.errors import OnnxoptError
    from onnxopt.optimize import optimize, validate_files

    (tmp_path / "rep").write_text("not a folder")
    with pytest.raises(OnnxoptError, match="rep: report path is not a folder"):
        optimize(MODEL, tmp_path / "o.onnx", report_dir=tmp_path / "rep")
    with pytest.raises(OnnxoptError, match="rep: report path is not a folder"):
        validate_files(MODEL, MODEL, VAL, report_dir=tmp_path / "rep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rep"]


# --------------------------------------------------------------------------------------------
# External data outside the model's folder is never opened
# --------------------------------------------------------------------------------------------
class OpenSpy:
    """Records every path opened through Python (builtins/io/os) or through onnx's C++ external-data
    opener while installed."""

    def __init__(self, monkeypatch):
        self.opened: list[pathlib.Path] = []
        real_open, real_os_open = builtins.open, os.open
        real_onnx_open = onnx.external_data_helper._open_external_data_fd

        def spy_open(file, *a, **k):
            self._note(file)
            return real_open(file, *a, **k)

        def spy_os_open(path, *a, **k):
            self._note(path)
            return real_os_open(path, *a, **k)

        def spy_onnx_open(base_dir, location, *a, **k):
            self._note(os.path.join(base_dir, location))
            return real_onnx_open(base_dir, location, *a, **k)

        monkeypatch.setattr(builtins, "open", spy_open)
        monkeypatch.setattr(io, "open", spy_open)
        monkeypatch.setattr(os, "open", spy_os_open)
        monkeypatch.setattr(onnx.external_data_helper, "_open_external_data_fd", spy_onnx_open)

    def _note(self, file):
        if isinstance(file, str | bytes | os.PathLike):
            self.opened.append(pathlib.Path(os.fsdecode(file)).resolve())

    def touched(self, folder: pathlib.Path) -> list[pathlib.Path]:
        folder = folder.resolve()
        return [p for p in self.opened if p == folder or folder in p.parents]


class InotifyWatch:
    """Linux inotify on one folder: sees opens and reads of its files by *any* code in any process
    (C++ included), without strace. ``events()`` drains what happened since the last call."""

    IN_ACCESS, IN_OPEN = 0x1, 0x20

    def __init__(self, folder: pathlib.Path):
        import ctypes

        self.libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self.libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0 or self.libc.inotify_add_watch(self.fd, os.fsencode(folder), self.IN_ACCESS | self.IN_OPEN) < 0:
            pytest.skip("inotify unavailable")

    def events(self) -> list[tuple[int, str]]:
        import struct

        out = []
        while True:
            try:
                buf = os.read(self.fd, 65536)
            except BlockingIOError:
                return out
            i = 0
            while i < len(buf):
                _, mask, _, size = struct.unpack_from("iIII", buf, i)
                name = buf[i + 16:i + 16 + size].rstrip(b"\0").decode()
                out.append((mask, name))
                i += 16 + size

    def close(self):
        os.close(self.fd)


@pytest.mark.parametrize("case_id", ["external-absolute", "external-dotdot", "external-dotdot-inner",
                                     "external-symlink-file", "external-symlink-dir"])
def test_outside_file_is_never_opened(tmp_path, monkeypatch, case_id):
    case = next(c for c in ALL_CASES if c.id == case_id)
    bad = case.build(tmp_path)
    outside = tmp_path / "outside"
    assert (outside / "secret.bin").is_file()
    watch = InotifyWatch(outside) if sys.platform == "linux" else None
    spy = OpenSpy(monkeypatch)
    try:
        for run_id, args in case.runs.items():
            out = tmp_path / f"out-{run_id}"
            out.mkdir()
            code, _, err = cli(*expand(args, bad=bad, out=out / "o.onnx", rep=out / "rep"))
            assert_refused(code, err, case.message)
        assert spy.touched(outside) == []
        assert spy.opened, "the spy saw nothing: it is not installed"
        if watch is not None:
            assert watch.events() == []
            with open(outside / "secret.bin", "rb") as f:  # control: the watch does see an open
                f.read()
            assert any(name == "secret.bin" for _, name in watch.events())
    finally:
        if watch is not None:
            watch.close()


def test_open_spy_sees_external_data_reads(tmp_path, monkeypatch):
    """Control: a legitimate external-data file inside the folder is opened, and the spy sees it (``inspect``
    reads no weight; writing the optimized model copies them)."""
    model = tiny()
    onnx.save_model(model, str(tmp_path / "ok.onnx"), save_as_external_data=True, location="ok.data",
                    size_threshold=0)
    spy = OpenSpy(monkeypatch)
    code, _, err = cli("inspect", tmp_path / "ok.onnx")
    assert code == 0, err
    assert (tmp_path / "ok.data").resolve() not in spy.opened
    code, _, err = cli("optimize", tmp_path / "ok.onnx", "-o", tmp_path / "out" / "o.onnx", "-q")
    assert code == 0, err
    assert (tmp_path / "ok.data").resolve() in spy.opened
