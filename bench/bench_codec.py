"""Benchmark of the update codec (schemas.codec): size on the wire and speed.

For each size (1M and 10M parameters; ``--quick``: 100k and 1M) and each setting (top-k 1%
and 0.1% with int8, dense int8, and top-k 1% with the int8 values stored raw instead of
zstd-compressed, ``rawv``: ``CodecConfig.zstd_values=False``) it reports bytes on the
wire and the ratio against raw fp32, encode and decode throughput, and the time of
decode + apply (``DecodedChunk.add_to``) as a ratio to numpy's raw sparse add
``target[idx] += vals`` of the same indices/values (dense: ``target += vals``), measured
in the same run. Times are medians over ``--repeats`` samples; a sample times a batch of
calls lasting >= ~20 ms, so that microsecond-sized calls are not lost in timer and
scheduler noise. Decode + apply and the raw add are sampled alternately. ``--no-kernels``
runs the pure-numpy path of ``schemas.codec.kernels`` (``FEDFLEET_CODEC_KERNELS=0``)
instead of the C kernels.

    .venv/bin/python bench/bench_codec.py [--quick] [--repeats N] [--no-kernels] [--json]

``--json`` prints one JSON line last. Numbers are written down in BENCHMARKS.md, never
asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
if "--no-kernels" in sys.argv:
    os.environ["FEDFLEET_CODEC_KERNELS"] = "0"

from schemas.codec import CodecConfig, decode, encode, kernels

SETTINGS: dict[str, CodecConfig] = {
    "topk1%+int8": CodecConfig(topk=0.01, quant="int8", zstd_level=3),
    "topk1%+int8 rawv": CodecConfig(topk=0.01, quant="int8", zstd_level=3, zstd_values=False),
    "topk0.1%+int8": CodecConfig(topk=0.001, quant="int8", zstd_level=3),
    "dense+int8": CodecConfig(topk=0.0, quant="int8", zstd_level=3),
}


def _batch(fn: Callable[[], object], min_s: float = 0.02) -> int:
    """Calls per sample so that one sample lasts at least ``min_s``."""
    fn()  # warm-up
    t0 = time.perf_counter()
    fn()
    one = max(time.perf_counter() - t0, 1e-7)
    return max(1, int(min_s / one) + 1)


def _sample(fn: Callable[[], object], calls: int) -> float:
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


def _median_time(fn: Callable[[], object], repeats: int) -> float:
    calls = _batch(fn)
    return statistics.median(_sample(fn, calls) for _ in range(repeats))


def bench_one(n: int, name: str, cfg: CodecConfig, repeats: int, seed: int = 0) -> dict[str, Any]:
    rng = np.random.default_rng(seed)
    delta = (rng.standard_normal(n) * 1e-3).astype(np.float32)
    frame = encode(delta, cfg)
    chunk = decode(frame, n)
    target = np.zeros(n, dtype=np.float32)
    idx = None if chunk.indices is None else chunk.indices.copy()
    vals = chunk.values.copy()

    t_enc = _median_time(lambda: encode(delta, cfg), repeats)
    t_dec = _median_time(lambda: decode(frame, n), repeats)

    def decode_apply() -> None:
        decode(frame, n).add_to(target)

    def raw_add() -> None:
        if idx is None:
            np.add(target, vals, out=target)
        else:
            target[idx] += vals

    # Alternate the two so that machine load hits both alike.
    calls_da, calls_raw = _batch(decode_apply), _batch(raw_add)
    t_da: list[float] = []
    t_raw: list[float] = []
    for _ in range(max(repeats, 3)):
        t_da.append(_sample(decode_apply, calls_da))
        t_raw.append(_sample(raw_add, calls_raw))
    t_da_m, t_raw_m = statistics.median(t_da), statistics.median(t_raw)
    return {
        "params": n,
        "setting": name,
        "k": int(vals.shape[0]),
        "bytes": len(frame),
        "fp32_bytes": 4 * n,
        "ratio_vs_fp32": round(4 * n / len(frame), 1),
        "bits_per_kept_value": round(8 * len(frame) / vals.shape[0], 2),
        "encode_s": t_enc,
        "decode_s": t_dec,
        "encode_mparams_s": round(n / t_enc / 1e6, 1),
        "decode_mparams_s": round(n / t_dec / 1e6, 1),
        "decode_apply_s": t_da_m,
        "raw_numpy_add_s": t_raw_m,
        "decode_apply_vs_raw_add": round(t_da_m / t_raw_m, 2),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (100k, 1M)")
    ap.add_argument("--json", action="store_true", help="print one JSON line last")
    ap.add_argument("--repeats", type=int, default=0, help="timing repeats (default 7, quick 3)")
    ap.add_argument("--no-kernels", action="store_true", help="pure-numpy codec path")
    args = ap.parse_args(argv)
    sizes = [100_000, 1_000_000] if args.quick else [1_000_000, 10_000_000]
    repeats = args.repeats or (3 if args.quick else 7)
    rows = []
    head = (
        f"{'params':>10} {'setting':<17} {'bytes':>10} {'x fp32':>8} {'enc Mp/s':>9} "
        f"{'dec Mp/s':>9} {'dec+apply ms':>13} {'raw add ms':>11} {'ratio':>6}"
    )
    print(head)
    for n in sizes:
        for name, cfg in SETTINGS.items():
            r = bench_one(n, name, cfg, repeats)
            rows.append(r)
            print(
                f"{n:>10} {name:<17} {r['bytes']:>10} {r['ratio_vs_fp32']:>8} "
                f"{r['encode_mparams_s']:>9} {r['decode_mparams_s']:>9} "
                f"{r['decode_apply_s'] * 1e3:>13.3f} {r['raw_numpy_add_s'] * 1e3:>11.3f} "
                f"{r['decode_apply_vs_raw_add']:>6}",
                flush=True,
            )
    if args.json:
        meta = {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "machine": platform.machine(),
            "repeats": repeats,
            "c_kernels": kernels.HAVE_C,
        }
        print(json.dumps({"bench": "codec", "meta": meta, "results": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
