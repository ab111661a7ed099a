"""`fedfleet job create | list | status | wait | stop` against a real coordinator (real
Kafka, Mosquitto and Redis from the session stack; scripted MQTT devices), plus the body
the flags build, where the URL and token come from, and `wait` on a mock transport."""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.service import Coordinator
from fedfleet.cli import main
from fedfleet.job_body import build_body
from fedfleet.job_cli import latest_eval, status_lines, wait
from fedfleet.job_client import JobClient, JobCliError, Target, Unreachable
from schemas.messages import Task, TaskResponse
from stack import StackInfo, envfile
from stack.procs import free_port
from tests.test_coordinator_integration import Device, coordinator_settings, eventually
from tests.test_sync_rounds import first, online

TOKEN = "adm"  # coordinator_settings' admin token


@pytest.fixture(autouse=True)
def no_stack_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    where = tmp_path / "stack.json"
    monkeypatch.setenv(envfile.ENV_VAR, str(where))
    monkeypatch.delenv(envfile.URL_VAR, raising=False)
    monkeypatch.delenv(envfile.TOKEN_VAR, raising=False)
    return where


async def job(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run ``fedfleet job ...`` in a thread (the coordinator shares this event loop)."""
    rc = await asyncio.to_thread(main, ["job", *argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --------------------------------------------------------------------------- real coordinator


@pytest.mark.integration
async def test_create_list_status_wait_until_the_job_completes(
    stack: Any, unique_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0)
    name = f"{unique_prefix}m"
    async with AsyncExitStack() as ex:
        coord = await ex.enter_async_context(Coordinator(s))
        dev = await ex.enter_async_context(
            Device(f"{unique_prefix.strip('.')}-d0", s.mqtt_host, s.mqtt_port)
        )
        await online(coord, [dev])
        url = ["--url", coord.rest_url, "--token", TOKEN]
        rc, out, err = await job(capsys, "create", *url, "--model-name", name, "--features", "4",
                                 "--classes", "2", "--shards", "1", "--concurrency", "1",
                                 "--max-wall-s", "2", "--eval-devices", "0")  # fmt: skip
        assert rc == 0, err
        jid = out.strip()
        assert jid.startswith("job-")
        await first(dev, "task", Task)  # it is being trained

        rc, out, _ = await job(capsys, "list", *url)
        assert rc == 0 and any(line.startswith(f"{jid}  {name}  ") for line in out.splitlines())

        rc, out, _ = await job(capsys, "status", *url, jid)
        assert rc == 0
        assert f"job        {jid}" in out and "aborts     none" in out
        assert "phase      training" in out
        assert "\nfederated  " in out and "shard 0" in out

        rc, out, err = await job(capsys, "wait", *url, jid, "--interval", "0.2")
        assert rc == 0, err
        assert out.strip().splitlines()[-1].startswith(f"job {jid} completed: max_wall_s")

        rc, out, _ = await job(capsys, "status", *url, "--json", jid)
        assert rc == 0 and json.loads(out)["job"]["status"] == "completed"


@pytest.mark.integration
async def test_file_and_flags_stop_timeout_and_refusals(
    stack: Any, unique_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0)
    spec_file = tmp_path / "job.json"
    spec_file.write_text(json.dumps({
        "model_name": f"{unique_prefix}a", "spec": {"family": "softmax", "n_features": 3},
        "stop": {"max_wall_s": 3600}, "train": {"lr": 0.2},
    }))  # fmt: skip
    async with Coordinator(s) as coord:
        url = ["--url", coord.rest_url, "--token", TOKEN]
        rc, out, err = await job(capsys, "create", *url, "--json", "--file", str(spec_file),
                                 "--labels", "cat,dog", "--max-updates", "50",
                                 "--target-accuracy", "0.95")  # fmt: skip
        assert rc == 0, err
        j = json.loads(out)
        assert j["spec"]["labels"] == ["cat", "dog"] and j["spec"]["n_classes"] == 2
        assert (j["stop"]["max_updates"], j["stop"]["max_wall_s"]) == (50, 3600)
        assert j["stop"]["target_accuracy"] == 0.95  # the server-side stop
        assert j["train"]["lr"] == 0.2

        rc, out, err = await job(capsys, "wait", *url, j["job_id"], "--timeout", "0.3",
                                 "--interval", "0.1")  # fmt: skip
        assert rc == 3 and "still running" in one_line(err)

        rc, out, _ = await job(capsys, "stop", *url, j["job_id"])
        assert rc == 0 and out.strip() == f"{j['job_id']} stopped"
        rc, out, _ = await job(capsys, "wait", *url, j["job_id"])
        assert rc == 0 and out.strip().splitlines()[-1].startswith(f"job {j['job_id']} stopped")

        rc, _, err = await job(capsys, "list", "--url", coord.rest_url, "--token", "wrong")
        assert rc == 0  # reading needs no token
        rc, _, err = await job(capsys, "stop", "--url", coord.rest_url, "--token", "wrong",
                               j["job_id"])  # fmt: skip
        assert rc == 1 and "admin token" in one_line(err)
        rc, _, err = await job(capsys, "status", *url, "no-such-job")
        assert rc == 1 and "404" in one_line(err)
        rc, _, err = await job(capsys, "create", *url, "--model-name", f"{unique_prefix}b",
                               "--features", "3", "--classes", "1")  # fmt: skip
        assert rc == 1 and "422" in one_line(err) and "n_classes" in err


@pytest.mark.integration
async def test_wait_exits_1_with_the_reason_when_the_job_fails(
    stack: Any, unique_prefix: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    s = coordinator_settings(stack, unique_prefix, tmp_path, lease_s=60.0).replace(
        fail_after_aborts=3
    )
    reason = "data_features: data has 5 features, the job's model takes 4"
    ids = [f"{unique_prefix.strip('.')}-d{i}" for i in range(4)]
    async with AsyncExitStack() as ex:
        coord = await ex.enter_async_context(Coordinator(s))
        devs = [await ex.enter_async_context(Device(i, s.mqtt_host, s.mqtt_port)) for i in ids]
        await online(coord, devs)
        url = ["--url", coord.rest_url, "--token", TOKEN]
        rc, out, err = await job(capsys, "create", *url, "--model-name", f"{unique_prefix}m",
                                 "--features", "4", "--classes", "2", "--shards", "1",
                                 "--concurrency", "2")  # fmt: skip
        assert rc == 0, err
        jid = out.strip()
        waiting = asyncio.ensure_future(asyncio.to_thread(
            main, ["job", "wait", *url, jid, "--interval", "0.2"]))  # fmt: skip
        answered: set[str] = set()

        async def aborted_until_wait_ends() -> bool:
            for d in devs:  # every device aborts every task for a data reason
                for t in d.got("task", Task):
                    if t.task_id not in answered:
                        answered.add(t.task_id)
                        await d.send("task_status", TaskResponse(
                            task_id=t.task_id, device_id=d.id, status="aborted",
                            reason=reason, ts=time.time()))  # fmt: skip
            return waiting.done()

        await eventually(aborted_until_wait_ends, timeout=90)
        assert waiting.result() == 1
        cap = capsys.readouterr()
        assert one_line(cap.err) == f"fedfleet: job {jid} failed: {reason}"
        rc, out, _ = await job(capsys, "status", *url, jid)
        assert rc == 0 and f"status     failed: {reason}" in out
        assert "aborts     data_features " in out


# --------------------------------------------------------------------------- no coordinator


def test_unreachable_coordinator_is_exit_2_in_one_line(no_stack_file: Path) -> None:
    import os

    env = dict(os.environ, **{envfile.ENV_VAR: str(no_stack_file)})
    for cmd in (["list"], ["wait", "j1"], ["status", "j1"]):
        p = subprocess.run(
            [sys.executable, "-m", "fedfleet", "job", *cmd, "--url",
             f"http://127.0.0.1:{free_port()}"],
            capture_output=True, text=True, timeout=60, env=env, check=False,
        )  # fmt: skip
        assert p.returncode == 2, p.stderr
        assert "does not answer" in one_line(p.stderr)


def test_bad_job_input_is_exit_1_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "job.json"
    bad.write_text("{not json")
    unreachable = ["--url", f"http://127.0.0.1:{free_port()}"]  # never asked
    for argv, why in [
        (["--file", str(bad)], "not JSON"),
        (["--file", str(tmp_path / "missing.json")], "job file"),
        (["--features", "4", "--classes", "2"], "--model-name"),
        (["--model-name", "m"], "--features"),
        (["--model-name", "m", "--features", "3"], "--classes"),
    ]:
        assert main(["job", "create", *unreachable, *argv]) == 1
        assert why in one_line(capsys.readouterr().err)


def _ns(**kw: Any) -> argparse.Namespace:
    return argparse.Namespace(**kw)


def test_flags_shape_the_body_over_the_file(tmp_path: Path) -> None:
    f = tmp_path / "j.json"
    f.write_text(json.dumps({"model_name": "a", "spec": {"n_features": 2, "n_classes": 3},
                             "stop": {"max_wall_s": 60}, "shards": 4}))  # fmt: skip
    body = build_body(
        _ns(
            file=f,
            model_name="b",
            target_accuracy=0.9,
            max_updates=None,
            eval_devices=5,
            eval_every=2,
            standardize=True,
            hidden=16,
        )
    )
    assert body == {
        "model_name": "b", "shards": 4, "standardize": True,
        "spec": {"n_features": 2, "n_classes": 3, "hidden": 16, "family": "mlp"},
        "stop": {"max_wall_s": 60, "target_accuracy": 0.9},
        "evaluation": {"devices": 5, "every_versions": 2},
    }  # fmt: skip
    body = build_body(_ns(model_name="c", features=4, labels=["x", "y", "z"]))
    assert body["spec"] == {"n_features": 4, "labels": ["x", "y", "z"], "family": "softmax",
                            "n_classes": 3}  # fmt: skip
    f.write_text(json.dumps({"model_name": "a", "stop": 3, "spec": {}}))
    with pytest.raises(JobCliError):
        build_body(_ns(file=f, max_updates=5))


def test_url_and_token_come_from_flag_env_stack_file_default(
    no_stack_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Target.resolve() == Target(url="http://127.0.0.1:8000", token="change-me")
    info = StackInfo(kafka_bootstrap="k:1", mqtt_host="m", mqtt_port=1, redis_url="redis://r",
                     kafka_impl="x", mqtt_impl="x", redis_impl="x")  # fmt: skip
    envfile.write(envfile.StackFile(info=info, coordinator_url="http://sf:1", admin_token="sf"))
    assert Target.resolve() == Target(url="http://sf:1", token="sf")
    monkeypatch.setenv(envfile.URL_VAR, "http://env:2/")
    monkeypatch.setenv(envfile.TOKEN_VAR, "env")
    assert Target.resolve() == Target(url="http://env:2", token="env")
    assert Target.resolve("http://flag:3", "flag") == Target(url="http://flag:3", token="flag")


def _mock(answers: list[Any]) -> JobClient:
    """A client whose GETs of the job answer ``answers`` in turn (an exception: raised)."""
    jobs = iter(answers)
    current: dict[str, Any] = {}

    def handler(req: httpx.Request) -> httpx.Response:
        if req.url.path.endswith("/metrics"):
            return httpx.Response(404, json={"detail": "Not Found"})  # no such route yet
        nxt = next(jobs, current.get("last"))
        if isinstance(nxt, Exception):
            raise nxt
        current["last"] = nxt
        return httpx.Response(200, json=nxt)

    return JobClient(Target(url="http://t"), transport=httpx.MockTransport(handler))


def test_wait_outcomes_on_a_mock_transport(capsys: pytest.CaptureFixture[str]) -> None:
    run = {"job_id": "j", "status": "running", "current_version": 1}
    failed = {**run, "status": "failed", "status_reason": "data_labels: label 7 >= 3 classes"}
    down = httpx.ConnectError("refused")
    kw: dict[str, Any] = {"timeout": 0.0, "interval": 0.0}
    assert wait(_mock([run, failed]), "j", grace=5.0, **kw) == 1
    assert "failed: data_labels" in capsys.readouterr().err
    # a coordinator that goes away after answering: tolerated for ``grace``, then exit 2
    assert wait(_mock([run, down, run, {**run, "status": "done"}]), "j", grace=60.0, **kw) == 0
    with pytest.raises(Unreachable):
        wait(_mock([run, down]), "j", grace=0.0, **kw)
    with pytest.raises(Unreachable):  # never reached: at once
        wait(_mock([down]), "j", grace=60.0, **kw)


def test_status_shows_new_fields_when_present() -> None:
    evals: list[dict[str, Any]] = [
        {"version": 4, "reports": 3, "examples": 90, "loss": 0.5, "accuracy": 0.8,
         "complete": True},
        {"version": 6, "reports": 1, "examples": 30, "loss": 0.4, "accuracy": 0.9,
         "complete": False},
    ]  # fmt: skip
    metrics: dict[str, Any] = {"job_id": "j", "evaluations": evals, "latest": None}
    assert latest_eval(metrics) == evals[0]  # the newest *complete* one
    job_view = {"job_id": "j", "model_name": "m", "status": "running", "phase": "statistics",
                "current_version": None, "aborts": {"deadline": 2},
                "shards": [{"shard": 0, "version": 0, "updates_applied": 0}]}  # fmt: skip
    text = "\n".join(status_lines(job_view, metrics))
    assert "phase      statistics" in text and "version    -" in text
    assert "aborts     deadline 2" in text and "accuracy 0.800 loss 0.500" in text
    assert "serves no" in "\n".join(status_lines(job_view, None))
    # the job's own ``federated`` field (the same shape) stands in for the metrics route
    with_fed = {**job_view, "federated": {**evals[0], "version": 5}}
    assert "federated  v5 accuracy 0.800" in "\n".join(status_lines(with_fed, None))
    assert "no complete evaluation yet" in "\n".join(
        status_lines({**job_view, "federated": None}, None)
    )


def test_status_shows_the_final_evaluation_of_an_ended_job() -> None:
    fin = {"version": 9, "reports": 40, "examples": 480, "loss": 0.2, "accuracy": 0.95,
           "complete": True, "final": True, "closed_ts": 2.0}  # fmt: skip
    job_view = {"job_id": "j", "model_name": "m", "status": "completed", "aborts": {},
                "final_evaluation": fin}  # fmt: skip
    text = "\n".join(status_lines(job_view, {"evaluations": [fin], "latest": fin}))
    assert "final      v9 accuracy 0.950 loss 0.200 (40 reports, 480 examples) [complete]" in text
    running = {**job_view, "final_evaluation": {**fin, "closed_ts": None}}
    assert "[running]" in "\n".join(status_lines(running, None))


def test_create_flags_name_an_uploaded_model() -> None:
    from fedfleet import job_cli

    parser = argparse.ArgumentParser()
    job_cli.register(parser.add_subparsers(dest="cmd"))
    args = parser.parse_args(["job", "create", "--model-name", "net", "--onnx", "m.onnx",
                              "--labels", "a,b", "--optimizer", "adam", "--lr", "0.01",
                              "--topk", "0.01", "--strategy", "fedbuff"])  # fmt: skip
    art = {"spec": {"family": "onnx", "artifact": "sha256:" + "a" * 64, "n_features": 4,
                    "n_classes": 2, "params": [{"name": "w", "shape": [2, 4]}],
                    "input_shape": [4]}}  # fmt: skip
    body = build_body(args, art)
    assert body["spec"]["family"] == "onnx" and body["spec"]["labels"] == ["a", "b"]
    assert body["train"] == {"optimizer": "adam", "lr": 0.01}
    assert body["codec"] == {"topk": 0.01} and body["strategy"] == {"name": "fedbuff"}
    assert "torch_module" not in body["spec"]
    with pytest.raises(JobCliError, match="not both"):
        job_cli.model_file(parser.parse_args(["job", "create", "--onnx", "m.onnx",
                                              "--torch-module", "a:b"]))  # fmt: skip
    with pytest.raises(JobCliError, match="cannot import"):
        job_cli.model_file(parser.parse_args(["job", "create", "--torch-module", "nope.x:f",
                                              "--input-shape", "4"]))  # fmt: skip
