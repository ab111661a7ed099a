"""The probe run of ``schemas.artifact.normalize``, in a child process that may die.

A user's ONNX file is a program for onnxruntime, and a hostile one need not be large: a
``Loop`` of 2**62 trips never ends, a ``ConstantOfShape`` of ``[2**20, 2**20]`` asks for
4 TiB, one ``MatMul`` of two generated 6000x6000 matrices runs for seconds past any
check between kernels, and a kernel bug can take its process down. So the probe runs in
one long-lived child (``python -c CHILD``: numpy and onnxruntime only), with onnxruntime's
CPU arena capped at ``memory`` bytes and the address space at that plus four times the
file; the caller waits at most ``timeout_s`` and kills the child past it. A killed or dead
child is replaced at the next probe (~0.5 s: importing onnxruntime). Probes are serialised,
one at a time per process. ``ProbeError`` carries the one-line reason.

Wire (pipes): the request is ``<QI`` (file bytes, rank), the rank's ``<q`` dims of the
zeros input, then the file; the answer is one JSON line, ``{"shapes": [[logits], [probs]],
"dtype": "float32", "finite": true}`` or ``{"error": "..."}``.
"""

from __future__ import annotations

import atexit
import json
import os
import struct
import subprocess
import sys
import threading
from dataclasses import dataclass
from typing import IO, Any

MEMORY: int = 1 << 30  # onnxruntime's arena in the child (a probe runs a batch of 2)
TIMEOUT_S: float = 30.0  # one probe, session build included (real models: milliseconds)
START_TIMEOUT_S: float = 120.0  # starting the child: importing onnxruntime
HEAD = struct.Struct("<QI")

CHILD = r"""
import json, os, resource, struct, sys
import numpy as np
import onnxruntime as ort

memory = int(sys.argv[1])
mi = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
ort.create_and_register_allocator(mi, ort.OrtArenaCfg({"max_mem": memory,
                                                       "arena_extend_strategy": 1}))


def vm_bytes():
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


inp, out = sys.stdin.buffer, sys.stdout.buffer


def read(n):
    b = inp.read(n)
    if len(b) != n:
        sys.exit(0)
    return b


def first_line(exc):
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


out.write(b"ready\n")
out.flush()
while True:
    size, rank = struct.unpack("<QI", read(12))
    shape = struct.unpack(f"<{rank}q", read(8 * rank))
    data = read(size)
    base = vm_bytes()
    if base is not None:
        hard = resource.getrlimit(resource.RLIMIT_AS)[1]
        soft = base + 2 * memory + 4 * size
        resource.setrlimit(resource.RLIMIT_AS, (soft if hard < 0 else min(soft, hard), hard))
    try:
        opts = ort.SessionOptions()
        opts.log_severity_level = 4
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.use_env_allocators", "1")
        sess = ort.InferenceSession(data, opts, providers=["CPUExecutionProvider"])
        ro = ort.RunOptions()
        ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
        res = sess.run(["logits", "probabilities"], {"x": np.zeros((2, *shape), np.float32)}, ro)
        logits, probs = (np.asarray(r) for r in res)
        rep = {"shapes": [list(logits.shape), list(probs.shape)], "dtype": str(logits.dtype),
               "finite": bool(np.isfinite(logits).all() and np.isfinite(probs).all())}
        del sess, res, logits, probs
    except BaseException as exc:
        rep = {"error": first_line(exc)}
    out.write(json.dumps(rep).encode() + b"\n")
    out.flush()
"""


class ProbeError(Exception):
    """The probe failed; ``str()`` is the one-line reason."""


@dataclass(frozen=True, slots=True)
class ProbeResult:
    logits_shape: tuple[int, ...]
    probs_shape: tuple[int, ...]
    dtype: str
    finite: bool


class ProbeProcess:
    """The child and the lock around it (module docstring)."""

    def __init__(self, memory: int = MEMORY) -> None:
        self.memory = memory
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid = 0  # the parent that started it (a fork starts its own)

    def _start(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._pid == os.getpid() and self._proc.poll() is None:
            return self._proc
        self._proc = None
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", CHILD, str(self.memory)], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, close_fds=True,
            )  # fmt: skip
        except OSError as exc:
            raise ProbeError(f"cannot start the probe process: {exc}") from None
        self._pid = os.getpid()
        if self._read_line(proc, START_TIMEOUT_S)[0] != b"ready\n":
            raise ProbeError(f"the probe process did not start (exit {proc.returncode})")
        self._proc = proc
        return proc

    @staticmethod
    def _read_line(proc: subprocess.Popen[bytes], timeout_s: float,
                   payload: bytes = b"") -> tuple[bytes, bool]:  # fmt: skip
        """Send ``payload``, read one line; (b"", timed_out) when the child died or was
        killed at ``timeout_s``."""
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        timer = threading.Timer(timeout_s, kill)
        timer.daemon = True
        timer.start()
        try:
            stdin, stdout = _pipe(proc.stdin), _pipe(proc.stdout)
            if payload:
                stdin.write(payload)
                stdin.flush()
            line = stdout.readline()
        except (OSError, ValueError):  # a broken pipe: the child is gone
            line = b""
        finally:
            timer.cancel()
        if not line:
            _discard(proc)
        return line, killed.is_set()

    def run(self, data: bytes, input_shape: tuple[int, ...], timeout_s: float) -> ProbeResult:
        req = HEAD.pack(len(data), len(input_shape)) + struct.pack(f"<{len(input_shape)}q",
                                                                   *input_shape)  # fmt: skip
        with self._lock:
            proc = self._start()
            line, timed_out = self._read_line(proc, timeout_s, req + data)
            if not line:
                self._proc = None
                if timed_out:
                    raise ProbeError(f"the probe run took longer than {timeout_s:g} s")
                raise ProbeError(f"the probe run died (exit {proc.returncode})")
            try:
                rep: dict[str, Any] = json.loads(line)
                if "error" in rep:
                    raise ProbeError(str(rep["error"]))
                lg, pr = rep["shapes"]
                return ProbeResult(tuple(lg), tuple(pr), str(rep["dtype"]), bool(rep["finite"]))
            except (ValueError, KeyError, TypeError):  # something else wrote to its stdout
                self._proc = None
                _discard(proc)
                raise ProbeError(f"the probe process answered {line[:80]!r}") from None

    def close(self) -> None:
        """Stop the child (idempotent); the next ``run`` starts another."""
        with self._lock:
            proc, self._proc = self._proc, None
            if proc is not None and self._pid == os.getpid():
                _discard(proc)


def _discard(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()
    for f in (proc.stdin, proc.stdout):
        if f is not None:
            try:
                f.close()
            except OSError:  # a broken pipe's buffered bytes
                pass


def _pipe(f: IO[bytes] | None) -> IO[bytes]:
    if f is None:
        raise ValueError("no pipe")
    return f


PROBE = ProbeProcess()
atexit.register(PROBE.close)
