"""Where tuning trials run: a small executor interface, ``local`` (worker processes) and ``ray``.

A trial is ``(job, trial)`` - two JSON-able dicts - and ``onnxopt.tune_trial.run_trial`` turns them into a
result dict and a model file. Executors only move those around; results come back in trial order, so the
search sees the same sequence whatever runs it and however many workers there are.

``local`` runs each trial in its own ``python -m onnxopt.tune_trial`` process (a trial that crashes ONNX
Runtime or hangs is recorded as failed, not fatal). ``ray`` runs it as a Ray task: the model and data files
travel through the object store, so the workers need no shared disk.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from onnxopt.errors import OnnxoptError


class Executor:
    name = "base"

    def __init__(self, workers: int = 1, timeout_s: float = 1800.0):
        self.workers = max(1, workers)
        self.timeout_s = timeout_s

    def map(self, job: dict, trials: list[dict]) -> list[dict]:
        """Run every trial; one result dict per trial, in the trials' order."""
        raise NotImplementedError

    def close(self) -> None:
        pass


def _failed(why: str) -> dict[str, Any]:
    return {"status": "error", "error": why}


class LocalExecutor(Executor):
    name = "local"

    def _one(self, job: dict, trial: dict) -> dict:
        with tempfile.TemporaryDirectory(prefix="onnxopt-trial-") as tmp:
            spec = Path(tmp) / "spec.json"
            out = Path(tmp) / "result.json"
            spec.write_text(json.dumps({"job": job, "trial": trial}))
            try:
                proc = subprocess.run([sys.executable, "-m", "onnxopt.tune_trial", str(spec), str(out)],
                                      capture_output=True, text=True, timeout=self.timeout_s,
                                      env={**os.environ, "OMP_NUM_THREADS": "1"})
            except subprocess.TimeoutExpired:
                return _failed(f"timed out after {self.timeout_s:.0f} s")
            if out.is_file():
                return json.loads(out.read_text())
            tail = (proc.stderr or proc.stdout or "").strip().splitlines()
            return _failed(f"trial process exited with {proc.returncode}: {tail[-1] if tail else 'no output'}")

    def map(self, job: dict, trials: list[dict]) -> list[dict]:
        if self.workers == 1 or len(trials) == 1:
            return [self._one(job, t) for t in trials]
        with ThreadPoolExecutor(self.workers) as pool:
            return list(pool.map(lambda t: self._one(job, t), trials))


def _files(path: str | None) -> dict[str, bytes] | None:
    """A data path as {relative name: bytes} (a file, or every file of a folder)."""
    if path is None or path.startswith("random:"):
        return None
    p = Path(path)
    if p.is_file():
        return {p.name: p.read_bytes()}
    return {str(f.relative_to(p)): f.read_bytes() for f in sorted(p.rglob("*")) if f.is_file()}


def _unpack(files: dict[str, bytes] | None, root: Path, original: str | None, single: bool) -> str | None:
    if files is None:
        return original
    root.mkdir(parents=True, exist_ok=True)
    for rel, data in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    return str(root / next(iter(files))) if single else str(root)


def _ray_trial(job: dict, trial: dict, blobs: dict[str, Any]) -> dict:
    """Runs on a Ray worker: lay the shipped files out in a temporary folder, run the trial in-process,
    send the model back as bytes."""
    from onnxopt.tune_trial import run_trial

    with tempfile.TemporaryDirectory(prefix="onnxopt-ray-trial-") as tmp:
        root = Path(tmp)
        job = dict(job)
        model_files = blobs["model"]
        _unpack(model_files, root / "model", None, True)
        job["model"] = str(root / "model" / Path(job["model"]).name)
        for key in ("calib", "val", "labels"):
            if blobs.get(key) is not None:
                single = Path(job[key]).is_file() if Path(job[key]).exists() else len(blobs[key]) == 1
                job[key] = _unpack(blobs[key], root / key, job[key], single)
        job["cache_dir"] = str(root / "cache")  # a remote worker has no shared cache
        name = Path(trial["output"]).name  # same file name as on the caller's side (external data refers to it)
        trial = {**trial, "output": str(root / "out" / name)}
        (root / "out").mkdir()
        try:
            result = run_trial(job, trial)
        except Exception as exc:  # noqa: BLE001 - recorded as a failed trial
            return _failed(f"{type(exc).__name__}: {exc}")
        if Path(trial["output"]).is_file():
            result["model_files"] = {f.name: f.read_bytes() for f in (root / "out").iterdir() if f.is_file()}
        return result


def _reachable(address: str, timeout: float = 5.0) -> bool:
    """Whether something listens at a Ray address (``host:port`` or ``ray://host:port``); ray.init itself
    retries an unreachable cluster for minutes."""
    import socket

    target = address.split("://", 1)[-1]
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        return True  # e.g. "auto": let Ray resolve it
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return True
    except OSError:
        return False


class RayExecutor(Executor):
    name = "ray"

    def __init__(self, workers: int = 1, timeout_s: float = 1800.0, address: str | None = None):
        super().__init__(workers, timeout_s)
        try:
            import ray
        except ImportError:
            raise OnnxoptError("--executor ray needs the ray package (pip install 'onnxopt[ray]')") from None
        self.ray = ray
        address = address or os.environ.get("RAY_ADDRESS")
        if address and not _reachable(address):
            raise OnnxoptError(f"cannot reach Ray at {address} (nothing answers there within 5 s); start the "
                               "cluster, fix --ray-address / RAY_ADDRESS, or use --executor local")
        try:
            if not ray.is_initialized():
                if address:
                    ray.init(address=address, log_to_driver=False, logging_level="ERROR")
                else:
                    ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                             logging_level="ERROR")
        except Exception as exc:  # noqa: BLE001 - one line, exit 2; never a silent fallback to local
            where = address or "a local Ray instance"
            raise OnnxoptError(f"cannot reach Ray at {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self._started = not address
        self._remote = ray.remote(num_cpus=1, max_retries=0)(_ray_trial)

    def map(self, job: dict, trials: list[dict]) -> list[dict]:
        ray = self.ray
        model = Path(job["model"])
        blobs = {"model": {f.name: f.read_bytes() for f in model.parent.iterdir()
                           if f.is_file() and (f == model or f.name.startswith(model.name + ".") or f.suffix == ".data")},
                 **{k: _files(job.get(k)) for k in ("calib", "val", "labels")}}
        ref = ray.put(blobs)
        futures = [self._remote.remote(job, t, ref) for t in trials]
        results = []
        for t, f in zip(trials, futures, strict=True):
            try:
                r = ray.get(f, timeout=self.timeout_s)
            except ray.exceptions.GetTimeoutError:
                ray.cancel(f, force=True)
                r = _failed(f"timed out after {self.timeout_s:.0f} s")
            except Exception as exc:  # noqa: BLE001 - a crashed worker is a failed trial
                r = _failed(f"ray task failed: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}")
            files = r.pop("model_files", None)
            if files:
                out = Path(t["output"])
                out.parent.mkdir(parents=True, exist_ok=True)
                for name, data in files.items():
                    (out.parent / name).write_bytes(data)
                r["output"] = str(out)
            results.append(r)
        return results

    def close(self) -> None:
        if self._started:
            self.ray.shutdown()


def make_executor(name: str, workers: int = 1, *, address: str | None = None, timeout_s: float = 1800.0) -> Executor:
    if name == "local":
        return LocalExecutor(workers, timeout_s)
    if name == "ray":
        return RayExecutor(workers, timeout_s, address)
    raise OnnxoptError(f"unknown executor {name!r} (choose: local, ray)")
