"""Load-test scenarios, small versions, on the session stack (as external servers).

Correctness only: the scenario completes, churn strands no task and loses no update, the
report files exist. Wall-clock figures and speed-up ratios are written down in
BENCHMARKS.md, never asserted here.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from loadtest import report
from loadtest.churn import task_summary
from loadtest.cli import main
from loadtest.train import TrainSettings, job_body, run_label
from sim.fleet import FleetSpec
from sim.hetero import diurnal_plug_factor, transfer_delay
from sim.pool import FleetPool
from sim.services import AggMetrics
from stack import StackInfo


def _servers(stack: StackInfo) -> list[str]:
    """The secure default: the session's Kafka, and a broker and Redis of the scenario's
    own (TLS, per-device credentials, a Redis password; every device enrols first)."""
    return ["--kafka", stack.kafka_bootstrap]


def _run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, dict[str, Any]]:
    rc = main(argv)
    captured = capsys.readouterr()
    out = captured.out.strip().splitlines()
    assert out, "no stdout"
    summary = json.loads(out[-1])
    summary["_stderr"] = captured.err
    return rc, summary


def _assert_exactly_once(summary: dict[str, Any]) -> None:
    """The failover ledgers: per shard, applied ids == logged ids ⊇ acked ids."""
    for sh in summary["shards"]:
        assert sh["lost_acked"] == sh["lost_logged"] == 0, sh
        assert sh["doubled"] == 0 and sh["rejected_after_ack"] == 0, sh
        assert sh["applied_not_logged"] == 0 and sh["applied"] == sh["logged"], sh
    assert summary["shards_agree"] and summary["acked_not_logged"] == 0, summary


def _files(out: Path, *names: str) -> None:
    for n in ("summary.json", "summary.md", *names):
        assert (out / n).is_file() and (out / n).stat().st_size > 0, n


# --------------------------------------------------------------------------- pure parts


def test_codec_names_map_to_job_codecs() -> None:
    from sim.tasks import codec_of
    from stack.errors import StackError

    assert codec_of("fp32") == {"topk": 0.0, "quant": "none"}
    assert codec_of("int8") == {"topk": 0.0, "quant": "int8"}
    assert codec_of("topk0.01-int8") == {"topk": 0.01, "quant": "int8"}
    assert codec_of("topk0.1-fp16") == {"topk": 0.1, "quant": "fp16"}
    for bad in ("int4", "topk-int8", "topk2-int8", "topk0-int8", "topkx-fp32", ""):
        with pytest.raises(StackError):
            codec_of(bad)


def test_train_flags_override_the_tasks_learning_defaults() -> None:
    from loadtest.cli import build_parser, train_values

    args = build_parser().parse_args(["train", "--task", "mnist1d", "--concurrency", "4"])
    v = train_values(args)
    assert v["devices"] == 1000 and v["lr"] == 2e-3 and v["concurrency"] == 4
    assert v["stable_versions"] == 10 and v["publish_every"] == 5
    assert train_values(build_parser().parse_args(["train"])) == {}


def test_byzantine_devices_are_a_fixed_share_picked_by_seed() -> None:
    whole = FleetSpec(devices=100, seed=3, byzantine_share=0.2, attack="scaled")
    picked = whole.byzantine()
    assert len(picked) == 20 and picked <= set(range(100))
    # a worker's slice sees the same set (it draws over the whole fleet, not its slice)
    part = FleetSpec(devices=50, first=50, total=100, seed=3, byzantine_share=0.2)
    assert part.byzantine() == picked
    assert FleetSpec(devices=100, seed=4, byzantine_share=0.2).byzantine() != picked
    assert FleetSpec(devices=100).byzantine() == frozenset()
    with pytest.raises(ValueError, match="attack"):
        FleetSpec(attack="nope")


def test_train_runs_with_and_without_the_update_bound() -> None:
    s = TrainSettings(strategies=("fedasync",), bounds=("on", "off"))
    on = job_body(s, "fedasync", "r1", bound="on")
    off = job_body(s, "fedasync", "r1", bound="off")
    assert "clip_multiplier" not in on["strategy"]  # the jobs' default bound applies
    assert off["strategy"]["clip_multiplier"] == 0.0
    assert on["job_id"] != off["job_id"] and on["model_name"] != off["model_name"]
    assert run_label("fedasync", "int8", s, "off") == "fedasync+noclip"
    assert run_label("fedasync", "int8", TrainSettings(), "on") == "fedasync"
    mom = job_body(TrainSettings(optimizer="momentum", lr=0.05), "fedasync", "r2")
    assert mom["train"]["optimizer"] == "momentum" and mom["train"]["momentum"] == 0.9
    assert "optimizer" not in on["train"]  # the task's (digits: the job default)


def test_slices_cover_the_fleet_once() -> None:
    pool = FleetPool(FleetSpec(devices=10, connect_per_s=300.0), processes=3, mqtt_host="h",
                     mqtt_port=1, api_url="u", log_dir=Path("/tmp"))  # fmt: skip
    sl = pool.slices()
    assert [s.devices for s in sl] == [4, 3, 3]
    assert [s.first for s in sl] == [0, 4, 7]
    assert all(s.total == 10 and s.connect_per_s == 100.0 for s in sl)


def test_heterogeneity_models() -> None:
    assert transfer_delay(1_000_000, 8000.0, 1.0) == pytest.approx(1.0)
    assert transfer_delay(1_000_000, 8000.0, 10.0) == pytest.approx(0.1)
    assert transfer_delay(0, 8000.0, 1.0) == 0.0
    assert diurnal_plug_factor(23.0) > diurnal_plug_factor(11.0)


def test_task_summary_counts_stranded() -> None:
    recs = [
        {"state": "uploaded", "deadline_ts": "10"},
        {"state": "expired", "deadline_ts": "10"},
        {"state": "offered", "deadline_ts": "100", "reissue_of": "x"},
        {"state": "accepted", "deadline_ts": "10"},
    ]
    s = task_summary(recs, now=50.0)
    assert s["active"] == 2 and s["stranded_overdue"] == 1 and s["reissued"] == 1


def test_staleness_histogram_from_cumulative_buckets() -> None:
    m = AggMetrics(staleness_buckets={0.0: 2.0, 1.0: 5.0, float("inf"): 6.0})
    assert m.staleness_hist() == [("0", 2), ("1", 3), ("+Inf", 1)]


def test_report_writes_files(tmp_path: Path) -> None:
    rows = [{"t": 0.0, "offline": 1, "idle": 2, "training": 0, "applied": 0},
            {"t": 1.0, "offline": 0, "idle": 2, "training": 1, "applied": 4}]  # fmt: skip
    plots = [report.plot_states(rows, tmp_path / "s.png", "t"),
             report.plot_rate(rows, "applied", tmp_path / "r.png", "t", "u/s")]  # fmt: skip
    report.write(tmp_path, {"scenario": "x", "nan": float("nan")}, ["hello"], plots)
    assert json.loads((tmp_path / "summary.json").read_text())["nan"] is None
    assert "hello" in (tmp_path / "summary.md").read_text()


def test_accuracy_plot_takes_a_federated_series(tmp_path: Path) -> None:
    held = {"fedasync": [(1.0, 0.5), (2.0, 0.7)], "fedavg": [(1.0, 0.4)]}
    fed = {"fedasync": [(1.5, 0.55), (2.5, 0.72)], "fedavg": []}  # fedavg: none served
    p = report.plot_accuracy(held, 0.8, tmp_path / "a.png", fed=fed)
    assert p.is_file() and p.stat().st_size > 0
    assert report.plot_accuracy(held, 0.8, tmp_path / "b.png").is_file()


async def test_monitor_reads_the_latest_federated_evaluation_and_tolerates_its_absence() -> None:
    import httpx

    from edge_agent.data import Dataset
    from sim.monitor import ModelMonitor, Snapshot, fed_text

    answers: list[httpx.Response] = [
        httpx.Response(404, json={"detail": "Not Found"}),
        httpx.Response(200, text="not json"),
        httpx.Response(200, json={"job_id": "j", "evaluations": [
            {"version": 3, "accuracy": 0.7, "complete": True},
            {"version": 5, "accuracy": 0.8, "loss": 0.4, "complete": True},
            {"version": 6, "accuracy": None, "complete": False}],
            "latest": {"version": 5, "accuracy": 0.8, "loss": 0.4}}),
        httpx.Response(200, json={"latest": {"version": "x"}}),
    ]

    def handler(req: httpx.Request) -> httpx.Response:
        assert req.url.path == "/v1/jobs/j/metrics"
        return answers.pop(0)

    import numpy as np

    test = Dataset(np.zeros((1, 2), np.float32), np.zeros(1, np.int64))
    async with httpx.AsyncClient(transport=httpx.MockTransport(handler), base_url="http://t") as h:
        mon = ModelMonitor(h, "m", "j", test)
        assert await mon.federated() is None  # no such route (yet)
        assert await mon.federated() is None
        assert await mon.federated() == {"version": 5, "accuracy": 0.8, "loss": 0.4}
        assert mon.fed_by_version == {3: 0.7, 5: 0.8}
        assert await mon.federated() is None  # a malformed answer: none, never a crash
    assert fed_text(Snapshot()) == "fed=-"
    assert fed_text(Snapshot(fed_accuracy=0.8125, fed_version=5)) == "fed=0.812@v5"


# --------------------------------------------------------------------------- scenarios


@pytest.mark.integration
def test_scale_small(stack: StackInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "scale"
    rc, summary = _run(["scale", "--devices", "200", "--processes", "2", "--rate", "100",
                        "--duration", "5", "--storm-timeout", "60", "--out", str(out),
                        "--json", *_servers(stack)], capsys)  # fmt: skip
    assert rc == 0, summary
    assert summary["connect_storm"]["all_connected_s"] is not None
    assert summary["reconnect_storm"]["all_reconnected_s"] is not None
    assert summary["steady"]["lag_redis"]["samples"] > 0
    _files(out, "devices_by_state.png", "telemetry_per_s.png", "lag_hist.png")


@pytest.mark.integration
def test_train_small(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The whole secure default, Kafka included: its own SASL_SSL brokers, which the
    coordinator and the aggregators log in to as their own users."""
    out = tmp_path / "train"
    rc, summary = _run(["train", "--devices", "60", "--concurrency", "10", "--time-budget", "20",
                        "--task-seconds", "0.5", "--target-accuracy", "0.5", "--out", str(out),
                        "--json"], capsys)  # fmt: skip
    assert rc == 0, summary
    assert "SASL_SSL" in summary["_stderr"], summary["_stderr"][-2000:]
    names = [r["strategy"] for r in summary["strategies"]]
    assert names == ["fedasync", "fedbuff", "fedavg"]
    for r in summary["strategies"]:
        assert r["updates_accepted"] > 0, r
    _files(out, "accuracy_vs_time.png", "staleness_hist.png", "updates_per_s.png",
           "devices_by_state.png")  # fmt: skip


@pytest.mark.integration
def test_train_with_byzantine_devices_runs_with_and_without_the_bound(
    stack: StackInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """20 % of the fleet uploads 100x-scaled updates over the real (secure) brokers; the same
    fleet trains one job with the default update-norm bound and one without."""
    out = tmp_path / "byz"
    rc, summary = _run(["train", "--devices", "40", "--concurrency", "8", "--strategies",
                        "fedasync", "--byzantine", "0.2", "--attack", "scaled", "--bounds",
                        "on,off", "--max-updates", "30", "--time-budget", "60",
                        "--task-seconds", "0.3", "--out", str(out), "--json",
                        *_servers(stack)], capsys)  # fmt: skip
    assert rc == 0, summary
    runs = {r["label"]: r for r in summary["strategies"]}
    assert set(runs) == {"fedasync+clip", "fedasync+noclip"}
    assert summary["settings"]["byzantine"] == 0.2
    for r in runs.values():
        assert r["updates_accepted"] >= 30, r


@pytest.mark.integration
@pytest.mark.timeout(420)
def test_train_mnist1d_compares_codecs_on_the_users_model(
    stack: StackInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--task mnist1d``: the CNN uploaded as an ONNX artifact, trained by simulated
    devices with PyTorch, dense fp32 and top-1% int8 uploads on the same fleet, each run
    ended at the same update budget and read after the drain."""
    pytest.importorskip("torch")
    out = tmp_path / "mnist1d"
    rc, summary = _run(["train", "--task", "mnist1d", "--devices", "20", "--concurrency", "4",
                        "--strategies", "fedasync", "--codecs", "fp32,topk0.01-int8",
                        "--max-updates", "6", "--local-epochs", "1", "--batch-size", "64",
                        "--time-budget", "150", "--task-seconds", "0.2", "--out", str(out),
                        "--json", *_servers(stack)], capsys)  # fmt: skip
    assert rc == 0, summary
    runs = {r["label"]: r for r in summary["strategies"]}
    assert set(runs) == {"fedasync+fp32", "fedasync+topk0.01-int8"}
    for r in runs.values():
        assert r["num_params"] == 102_282 and r["updates_accepted"] >= 6, r
        assert set(r["aggregator_rejected"]) <= {"duplicate"}, r  # re-sends
    dense, sparse = runs["fedasync+fp32"], runs["fedasync+topk0.01-int8"]
    assert dense["bytes_per_update"] > 4 * 102_282 * 0.3  # zstd of fp32 deltas: ~0.66
    (row,) = [c for c in summary["codecs"] if c["label"] == sparse["label"]]
    assert row["ratio_vs_fp32_run"] > 50, row  # the figure itself is for BENCHMARKS.md


@pytest.mark.integration
def test_churn_small(stack: StackInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "churn"
    rc, summary = _run(["churn", "--devices", "100", "--concurrency", "15", "--duration", "12",
                        "--lease", "8", "--out", str(out), "--json", *_servers(stack)],
                       capsys)  # fmt: skip
    assert summary["dropped_devices"] >= 27, summary
    assert summary["stranded_tasks"] == 0, summary["tasks"]
    assert summary["lost_updates"] == 0, summary
    assert summary["double_applied"] == 0, summary
    assert summary["device_acked_not_uploaded"] == [], summary
    assert summary["updates_accepted"] > 0
    assert rc == 0, summary
    _files(out, "devices_by_state.png", "updates_per_s.png")


@pytest.mark.integration
@pytest.mark.parametrize("aggregators", [2, 3])
def test_failover_kill9_applies_every_acked_update_on_every_shard(
    stack: StackInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str], aggregators: int
) -> None:
    """kill -9 of one aggregator mid-job, down past the session timeout (a survivor takes
    its partition over and catches up on records whose bases are the dead shard's last
    announcement), then back: per shard, applied ids == logged ids ⊇ acked ids."""
    out = tmp_path / "failover"
    rc, summary = _run(["failover", "--devices", "80", "--concurrency", "20",
                        "--aggregators", str(aggregators), "--kills", "1",
                        "--warmup-updates", "40", "--down", "15", "--between", "8",
                        "--out", str(out), "--json", *_servers(stack)], capsys)  # fmt: skip
    assert summary["acked"] > 100, summary
    _assert_exactly_once(summary)
    # REST reports per shard, and every shard applied what was accepted
    assert [r["updates_applied"] for r in summary["rest_shards"]] == [
        summary["updates_accepted"]
    ] * aggregators, summary["rest_shards"]
    assert rc == 0, summary
    _files(out, "updates_per_s.png")


@pytest.mark.integration
@pytest.mark.parametrize("fault", ["redis", "redis-wipe"])
def test_failover_kill9_of_redis_mid_job_loses_nothing_and_the_job_resumes(
    stack: StackInfo, tmp_path: Path, capsys: pytest.CaptureFixture[str], fault: str
) -> None:
    """kill -9 of redis-server mid-job, 8 s down, started again on its port: with its
    append-only file (``redis``) or empty (``redis-wipe``: the job comes back from the
    coordinator's journal). The job is served again within 10 s of Redis coming up and
    accepts updates again; per shard, applied ids == logged ids ⊇ acked ids."""
    out = tmp_path / "failover"
    servers = _servers(stack)  # secure, Redis our own: a wipe loses the credentials too,
    # and the coordinator restores them from its credential journal (fl.credentials)
    rc, summary = _run(["failover", "--fault", fault, "--devices", "60", "--concurrency",
                        "20", "--aggregators", "2", "--kills", "1", "--warmup-updates", "30",
                        "--down", "8", "--between", "12", "--out", str(out), "--json",
                        *servers], capsys)  # fmt: skip
    (row,) = summary["kills"]
    assert row["fault"] == fault and row["job_back_s"] is not None, row
    assert row["job_back_s"] < 10.0 and row["resumed_s"] is not None, row
    assert summary["acked"] > 50, summary
    _assert_exactly_once(summary)
    assert rc == 0, summary
