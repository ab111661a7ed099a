"""`fedfleet job create | list | status | wait | stop`: jobs over the coordinator's REST API.

The coordinator URL and admin token come from ``--url``/``--token`` >
``FEDFLEET_COORDINATOR_URL``/``FEDFLEET_ADMIN_TOKEN`` > the stack file > the defaults
(``http://127.0.0.1:8000``, the coordinator's default token). Exit status: 0 ok, 1 the
coordinator refused (or ``wait``: the job failed), 2 unreachable or bad usage, 3 ``wait``
timed out.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from fedfleet.job_body import add_flags, build_body
from fedfleet.job_client import JobClient, JobCliError, Target, Unreachable
from fedfleet.model_export import export_module

ENDED_OK = ("completed", "stopped", "done")
ENDED = (*ENDED_OK, "failed")


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("job", help="create, list, watch and stop training jobs (REST)")
    js = p.add_subparsers(dest="job_cmd", required=True)

    def cmd(name: str, help: str) -> argparse.ArgumentParser:
        c = js.add_parser(name, help=help)
        c.add_argument("--url", help="coordinator REST URL (env FEDFLEET_COORDINATOR_URL)")
        c.add_argument("--token", help="admin token (env FEDFLEET_ADMIN_TOKEN)")
        c.add_argument("--json", action="store_true", help="print the coordinator's JSON")
        return c

    add_flags(cmd("create", "create a job from --file and/or flags; prints its id"))
    cmd("list", "one line per job")
    cmd("status", "status, version, updates, aborts, federated evaluation").add_argument("job")
    w = cmd("wait", "block until the job ends: 0 completed/stopped, 1 failed, 3 timeout")
    w.add_argument("job")
    w.add_argument("--timeout", type=float, default=0.0, help="seconds (0: no limit)")
    w.add_argument("--interval", type=float, default=2.0, help="seconds between polls")
    w.add_argument(
        "--grace",
        type=float,
        default=30.0,
        help="seconds the coordinator may stay unreachable once reached",
    )
    cmd("stop", "stop the job (acknowledged uploads are still applied)").add_argument("job")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    target = Target.resolve(args.url, args.token)
    with JobClient(target) as client:
        if args.job_cmd == "create":
            art = None
            if args.onnx is not None or args.torch_module:
                art = client.upload_artifact(model_file(args), args.trainable)
            job = client.create(build_body(args, art))
            print(json.dumps(job) if args.json else job["job_id"])
            return 0
        if args.job_cmd == "list":
            jobs = client.list()
            if args.json:
                print(json.dumps(jobs))
            for j in [] if args.json else jobs:
                print(job_line(j))
            return 0
        if args.job_cmd == "status":
            job = client.get(args.job)
            metrics = client.metrics(args.job)
            if args.json:
                print(json.dumps({"job": job, "metrics": metrics}))
            else:
                print("\n".join(status_lines(job, metrics)))
            return 0
        if args.job_cmd == "stop":
            job = client.stop(args.job)
            print(json.dumps(job) if args.json else f"{job['job_id']} {job.get('status', '?')}")
            return 0
        return wait(client, args.job, timeout=args.timeout, interval=args.interval,
                    grace=args.grace)  # fmt: skip


def model_file(args: argparse.Namespace) -> bytes:
    """The ONNX bytes of ``--onnx FILE`` or of ``--torch-module`` (exported here)."""
    if args.onnx is not None and args.torch_module:
        raise JobCliError("give --onnx or --torch-module, not both")
    if args.onnx is not None:
        try:
            data: bytes = args.onnx.read_bytes()
        except OSError as exc:
            raise JobCliError(f"--onnx {args.onnx}: {exc.strerror or exc}") from None
        return data
    return export_module(args.torch_module, args.input_shape or ())


# ------------------------------------------------------------------ display (pure)
def latest_eval(metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The newest complete federated evaluation (``latest``), None when there is none."""
    if not metrics:
        return None
    latest = metrics.get("latest")
    if isinstance(latest, dict):
        return latest
    done = [e for e in metrics.get("evaluations") or [] if isinstance(e, dict) and
            e.get("complete")]  # fmt: skip
    return max(done, key=lambda e: int(e.get("version", -1)), default=None)


def eval_text(ev: dict[str, Any]) -> str:
    acc, loss = ev.get("accuracy"), ev.get("loss")
    parts = [f"v{ev.get('version', '?')}"]
    if isinstance(acc, int | float):
        parts.append(f"accuracy {acc:.3f}")
    if isinstance(loss, int | float):
        parts.append(f"loss {loss:.3f}")
    parts.append(f"({ev.get('reports', 0)} reports, {ev.get('examples', 0)} examples)")
    return " ".join(parts)


def _ver(job: dict[str, Any]) -> str:
    v = job.get("current_version")
    return "-" if v is None else str(v)


def job_line(job: dict[str, Any]) -> str:
    reason = f" ({job['status_reason']})" if job.get("status_reason") else ""
    return (f"{job.get('job_id', '?')}  {job.get('model_name', '?')}  "
            f"{job.get('status', '?')}{reason}  v{_ver(job)}  "
            f"accepted {job.get('updates_accepted', 0)}  "
            f"applied {job.get('updates_applied', 0)}")  # fmt: skip


def _counts(d: dict[str, Any]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) if d else "none"


def status_lines(job: dict[str, Any], metrics: dict[str, Any] | None) -> list[str]:
    out = [f"job        {job.get('job_id', '?')}  (model {job.get('model_name', '?')})",
           f"status     {job.get('status', '?')}"
           + (f": {job['status_reason']}" if job.get("status_reason") else "")]  # fmt: skip
    if job.get("phase") is not None:
        out.append(f"phase      {job['phase']}")
    out.append(f"version    {_ver(job)}")
    out.append(
        f"updates    accepted {job.get('updates_accepted', 0)}  applied "
        f"{job.get('updates_applied', 0)}  rejected {job.get('updates_rejected', 0)}  "
        f"rejected by shards {job.get('updates_rejected_by_shards', 0)}"
    )
    for sh in job.get("shards") or []:
        out.append(
            f"  shard {sh.get('shard', '?')}  v{sh.get('version', 0)}  applied "
            f"{sh.get('updates_applied', 0)}  rejected {sh.get('updates_rejected', 0)}  "
            f"mean staleness {float(sh.get('mean_staleness', 0.0)):.2f}"
        )
    out.append(f"aborts     {_counts(job.get('aborts') or {})}")
    ev = newest_eval(job, metrics)
    if ev is not None:
        out.append(f"federated  {eval_text(ev)}")
    elif metrics is None and "federated" not in job:
        out.append("federated  (this coordinator serves no /v1/jobs/{id}/metrics)")
    else:
        out.append("federated  no complete evaluation yet")
    fin = job.get("final_evaluation") or (metrics or {}).get("final")
    if isinstance(fin, dict):  # an ended job's final version, scored by the fleet
        state = ("running" if fin.get("closed_ts") is None else
                 "complete" if fin.get("complete") else "too few reports")  # fmt: skip
        out.append(f"final      {eval_text(fin)} [{state}]")
    return out


def newest_eval(job: dict[str, Any], metrics: dict[str, Any] | None) -> dict[str, Any] | None:
    """The latest complete evaluation: from the metrics route, else the job's
    ``federated`` field (the same shape), else None."""
    ev = latest_eval(metrics)
    fed = job.get("federated")
    return ev if ev is not None else fed if isinstance(fed, dict) else None


def progress_line(job: dict[str, Any], metrics: dict[str, Any] | None) -> str:
    ev = newest_eval(job, metrics)
    phase = f" phase {job['phase']}" if job.get("phase") is not None else ""
    fed = f"  federated {eval_text(ev)}" if ev else ""
    aborts = job.get("aborts") or {}
    ab = f"  aborts {sum(int(v) for v in aborts.values())}" if aborts else ""
    return (f"{job.get('status', '?')}{phase}  v{_ver(job)}  applied "
            f"{job.get('updates_applied', 0)}/{job.get('updates_accepted', 0)} accepted"
            f"{ab}{fed}")  # fmt: skip


# ------------------------------------------------------------------ wait
def wait(
    client: JobClient, job_id: str, *, timeout: float, interval: float, grace: float,
    out: TextIO | None = None,
) -> int:  # fmt: skip
    """Poll until the job ends; progress lines on ``out`` when something changed."""
    out = out or sys.stdout
    t0 = time.monotonic()
    reached = False
    down_since: float | None = None
    last = ""
    while True:
        now = time.monotonic()
        try:
            job = client.get(job_id)
            metrics = client.metrics(job_id)
        except Unreachable:
            if not reached or now - (down_since or now) >= grace:
                raise
            down_since = down_since or now
            time.sleep(interval)
            continue
        reached, down_since = True, None
        line = progress_line(job, metrics)
        if line != last:
            print(f"[{now - t0:5.0f}s] {line}", file=out, flush=True)
            last = line
        status = str(job.get("status", ""))
        reason = str(job.get("status_reason") or "")
        if status in ENDED_OK:
            print(f"job {job_id} {status}" + (f": {reason}" if reason else ""), file=out)
            return 0
        if status == "failed":
            print(f"fedfleet: job {job_id} failed: {reason or 'no reason given'}",
                  file=sys.stderr)  # fmt: skip
            return 1
        if timeout and now - t0 >= timeout:
            print(f"fedfleet: job {job_id} still {status} after {timeout:g} s", file=sys.stderr)
            return 3
        time.sleep(interval)


__all__ = ["job_line", "latest_eval", "progress_line", "register", "status_lines", "wait"]
