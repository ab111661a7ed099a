"""``fedfleet agent``: run an edge agent, or ``fedfleet agent predict`` on-device inference.

    fedfleet agent --device-id D --mqtt HOST:PORT --api URL --data FILE.npz [options]
    fedfleet agent predict --api URL --model NAME --input FILE.(npz|csv) [--logits]
        [--label-column NAME]   # with labels in the input: also the accuracy (on stderr)
    fedfleet agent enrol --api URL --token TOKEN --device-id D --state-dir DIR

After ``enrol`` the state directory holds the device's credential (``edge_agent.credentials``):
``fedfleet agent --device-id D --state-dir DIR ...`` then connects with it over TLS.

Flags override ``FEDFLEET_AGENT_*`` environment variables, which override ``--config``
(TOML with an ``[agent]`` table, or JSON). ``build_agent`` is the agent this command runs;
``main(argv, crash=...)`` runs it with collaborators injected (``tests/crashing_agent.py``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge_agent import credentials
from edge_agent.data import Dataset
from edge_agent.errors import AgentError, DataError
from edge_agent.labels import class_names, to_classes
from edge_agent.settings import AgentSettings
from schemas.atomic import check_writable_dir
from schemas.errors import FedfleetError
from schemas.messages import ModelSpecMsg
from schemas.settings import parse_mqtt_url

if TYPE_CHECKING:
    from edge_agent.agent import EdgeAgent
    from edge_agent.crash import CrashPoints
    from edge_agent.pacing import ComputePacer

log = logging.getLogger("edge_agent")


def mqtt_address(text: str) -> tuple[str, int, bool]:
    """``host:port``, ``mqtt://host:port`` or ``mqtts://host:port`` (TLS: needs the fleet
    CA, ``--mqtt-ca`` or an enrolled state directory; never plain TCP)."""
    try:
        return parse_mqtt_url(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="TOML/JSON config file ([agent] table)")
    p.add_argument("--device-id", dest="device_id")
    p.add_argument("--api", dest="api_url", help="coordinator REST base URL")
    p.add_argument("--model", dest="model_name")
    p.add_argument("--public-key", dest="public_key_hex", help="pinned Ed25519 key (hex)")
    p.add_argument("--state-dir", dest="state_dir", help="outbox, residual and model cache")
    p.add_argument(
        "--label-column",
        "--label-col",
        dest="label_column",
        help="CSV column of the labels (default: label); .npz: the key (y)",
    )
    p.add_argument("--features", dest="feature_cols", help="comma-separated feature columns")
    p.add_argument("--log-level", default="INFO")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedfleet agent", description=__doc__.split("\n")[0])
    _common(p)
    p.add_argument("--mqtt", type=mqtt_address,
                   help="MQTT broker: host:port, mqtt://host:port or mqtts://host:port (TLS); "
                        "default: the enrolled credential's, else 127.0.0.1:1883")  # fmt: skip
    p.add_argument("--mqtt-username", dest="mqtt_username")
    p.add_argument("--mqtt-password", dest="mqtt_password")
    p.add_argument("--mqtt-ca", dest="mqtt_cafile", help="fleet CA (PEM) to verify the broker")
    p.add_argument("--data", dest="data_path", help="local training data (.npz or .csv)")
    p.add_argument(
        "--eval-fraction",
        dest="eval_fraction",
        type=float,
        help="share of local rows held out for eval tasks, 0 <= f < 1 (0.2)",
    )
    p.add_argument(
        "--http-upload-min-bytes",
        dest="http_upload_min_bytes",
        type=int,
        help="updates of at least this size go over HTTP, smaller over MQTT (524288; 0: all)",
    )
    p.add_argument("--no-http-uploads", dest="http_uploads", action="store_const", const=False,
                   help="MQTT only (also while MQTT is down)")  # fmt: skip
    p.add_argument("--telemetry-interval", dest="telemetry_interval_s", type=float)
    p.add_argument("--metered", action="store_const", const=True, default=None)
    p.add_argument("--no-inference", dest="inference", action="store_const", const=False)
    p.add_argument("--probe", choices=["linux", "simulated"], default="linux")
    p.add_argument("--seed", type=int)
    p.add_argument("--trainer", choices=["numpy", "torch"], help="torch: fedfleet[torch] extra")
    return p


def build_predict_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fedfleet agent predict")
    _common(p)
    p.add_argument("--input", required=True, help=".npz (key x) or .csv (features)")
    p.add_argument("--logits", action="store_true", help="print logits, not classes")
    return p


_NOT_SETTINGS = {"log_level", "probe", "mqtt", "input", "logits"}


def settings_from(ns: argparse.Namespace, **extra: Any) -> AgentSettings:
    """The agent's settings from its flags, completed by the credential its state
    directory holds (``edge_agent.credentials``; flags win)."""
    values = {k: v for k, v in vars(ns).items() if k not in _NOT_SETTINGS}
    mqtt = getattr(ns, "mqtt", None)
    if mqtt is not None:
        values["mqtt_host"], values["mqtt_port"], tls = mqtt
    values.update(extra)
    s = credentials.apply(AgentSettings.load(values))
    if mqtt is not None:
        s = dataclasses.replace(s, mqtt_host=mqtt[0], mqtt_port=mqtt[1])
        if tls and s.mqtt_cafile is None:
            raise AgentError("mqtt_cafile", f"mqtts://{mqtt[0]}:{mqtt[1]} needs the fleet CA: "
                             "--mqtt-ca FILE, or enrol first (fedfleet agent enrol)")  # fmt: skip
        if not tls and s.mqtt_cafile is not None:
            raise AgentError("mqtt", "this device speaks TLS to its broker (its credential or "
                             "--mqtt-ca): give --mqtt as mqtts://host:port")  # fmt: skip
    return s


def writable_dir(path: Path) -> None:
    """Create ``path`` if needed and prove it is writable, or say why not (one line)."""
    try:
        check_writable_dir(path)
    except OSError as exc:
        raise AgentError("state_dir", f"cannot use {path}: {exc}") from None


def build_agent(
    settings: AgentSettings,
    *,
    probe_kind: str = "linux",
    crash: CrashPoints | None = None,
    pacer: ComputePacer | None = None,
) -> EdgeAgent:
    """The agent ``fedfleet agent`` runs: its data from ``settings.data_path``, the probe
    named by ``probe_kind`` and the collaborators given. ``simulated``: a ``SimulatedProbe``
    whose compute time ``SimulatedCompute`` waits out, unless ``pacer`` is given."""
    from edge_agent.agent import EdgeAgent
    from edge_agent.data import load_dataset
    from edge_agent.pacing import SimulatedCompute
    from edge_agent.probe import DeviceProbe, LinuxProbe, SimulatedProbe

    if settings.data_path is None:
        raise AgentError("data", "--data is required")
    if settings.state_dir is not None:
        writable_dir(settings.state_dir)
    problem: DataError | None = None
    try:
        data = load_dataset(
            settings.data_path, label_col=settings.label_column, feature_cols=settings.feature_cols
        )
    except DataError as exc:  # run anyway: every task is aborted with this reason, so the
        # coordinator shows it per job (REST, /metrics) instead of a device that never came
        if not Path(settings.data_path).exists():
            raise  # a path that does not exist is a typo: one line, exit 2
        log.warning("agent %s: data unusable (%s); tasks will be refused with this reason",
                    settings.device_id, exc)  # fmt: skip
        data, problem = Dataset.none(), exc
    probe: DeviceProbe
    if probe_kind == "simulated":
        probe = SimulatedProbe(seed=settings.seed)
        pacer = pacer or SimulatedCompute(probe)
    else:
        probe = LinuxProbe(
            metered=settings.metered,
            idle_max_load=settings.idle_max_load,
            idle_input_s=settings.idle_input_s,
        )
    return EdgeAgent(settings, probe, data, crash=crash, pacer=pacer, data_problem=problem)


async def _run(settings: AgentSettings, probe_kind: str, crash: CrashPoints | None) -> int:
    agent = build_agent(settings, probe_kind=probe_kind, crash=crash)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, lambda: asyncio.ensure_future(agent.stop()))
    log.info(
        "agent %s: %d samples (%d held out for eval), mqtt %s:%d, api %s",
        settings.device_id,
        len(agent.dataset),
        len(agent.split.holdout),
        settings.mqtt_host,
        settings.mqtt_port,
        settings.api_url,
    )
    async with agent:
        await agent.run()
    log.info("agent stopped: %s", json.dumps(agent.stats.as_dict()))
    return 0


async def _predict(settings: AgentSettings, input_path: str, logits: bool) -> int:
    from edge_agent.agent import http_client
    from edge_agent.data import load_predict_input
    from edge_agent.inference import OnnxModel
    from edge_agent.model_cache import model_client
    from schemas.modelspec import forward

    if not settings.model_name:
        raise AgentError("model", "--model is required")
    x, labelled = load_predict_input(
        input_path, label_col=settings.label_column, feature_cols=settings.feature_cols
    )
    async with http_client(settings) as http:
        mc = model_client(settings, http)  # pinned key, freshness, as the running agent
        model = await mc.pull(settings.model_name)
        spec = model.manifest.spec
        if x.shape[1] != spec.n_features:
            have, want = x.shape[1], spec.n_features
            raise DataError("features", f"{input_path} has {have} features, the model takes {want}")
        try:
            art = await mc.onnx(settings.model_name, model.manifest.version)
            out = OnnxModel.load(art.data).run(x)
            how = f"onnx v{art.version}"
        except AgentError as exc:
            log.warning("ONNX unavailable (%s); using the verified weights", exc)
            out = forward(spec, model.params, x)
            how = f"weights v{model.manifest.version}"
    log.info("predicted %d rows with %s", len(x), how)
    names = class_names(spec.labels, spec.n_classes)
    pred = out.argmax(axis=1) if len(out) else np.zeros(0, np.int64)
    for row, cls in zip(out, pred, strict=True):
        print(json.dumps(row.tolist()) if logits else names[int(cls)])
    if labelled is not None:
        print(accuracy_line(labelled, pred, spec), file=sys.stderr)
    return 0


def accuracy_line(labelled: Dataset, pred: npt.NDArray[np.integer], spec: ModelSpecMsg) -> str:
    """``accuracy 0.9333 (14/15 rows)``; rows whose label is none of the model's classes
    count as wrong and are named."""
    want = np.full(len(labelled), -1, np.int64)
    unknown = 0
    for code in np.unique(labelled.y).tolist():
        rows = labelled.y == code
        try:
            want[rows] = to_classes(np.asarray([code], np.int64), labelled.names,
                                    n_classes=spec.n_classes, labels=spec.labels)[0]  # fmt: skip
        except DataError:
            unknown += int(rows.sum())
    right = int(np.sum(want == pred))
    n = len(labelled)
    line = f"accuracy {right / n:.4f} ({right}/{n} rows)" if n else "accuracy - (0 rows)"
    if unknown:
        line += f"; {unknown} rows have a label that is not one of the model's classes"
    return line


def build_enrol_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fedfleet agent enrol",
        description="trade an operator's one-use enrolment token for this device's own "
                    "credential, stored (owner-only) in --state-dir",
    )  # fmt: skip
    env = os.environ
    p.add_argument("--api", default=env.get("FEDFLEET_AGENT_API_URL") or None,
                   help="coordinator REST base URL (default: FEDFLEET_AGENT_API_URL, or the "
                        "stack file's)")  # fmt: skip
    p.add_argument("--token", help="enrolment token (POST /v1/enrolment-tokens); without "
                   "one, --admin-token asks the coordinator for one bound to --device-id")
    p.add_argument("--admin-token", default=env.get("FEDFLEET_ADMIN_TOKEN") or None,
                   help="the operator's admin token (default: FEDFLEET_ADMIN_TOKEN, or the "
                        "stack file's): enrol a device from the operator's machine")  # fmt: skip
    p.add_argument("--device-id", required=True)
    p.add_argument("--state-dir", required=True, type=Path)
    p.add_argument("--ca", type=Path, default=env.get("FEDFLEET_AGENT_API_CAFILE") or None,
                   help="the fleet CA (PEM) an https:// --api must chain to (default: "
                        "FEDFLEET_AGENT_API_CAFILE, or the stack file's; else the system's "
                        "trust store)")  # fmt: skip
    p.add_argument("--wait", type=float, default=30.0, metavar="S",
                   help="wait up to S seconds for a coordinator that is still starting "
                        "(GET /readyz) before enrolling (0: do not wait)")  # fmt: skip
    p.add_argument("--log-level", default="INFO")
    return p


async def _coordinator_up(http: Any, api: str, wait_s: float) -> None:
    """Until the coordinator answers ``/readyz`` with 200 or ``wait_s`` passes (then the
    enrolment request itself reports what is wrong). Only readiness is polled, never the
    enrolment: a token is spent once."""
    import httpx

    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            if (await http.get(api.rstrip("/") + "/readyz")).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        await asyncio.sleep(0.5)


async def _enrol(ns: argparse.Namespace) -> int:
    import httpx

    if not ns.api:
        raise AgentError("api", "give the coordinator's URL (--api; no stack file names one)")
    if not ns.token and not ns.admin_token:
        raise AgentError("token", "give an enrolment token (--token), or the operator's "
                                  "admin token (--admin-token) to ask for one")  # fmt: skip
    writable_dir(ns.state_dir)
    verify = credentials.https_verify(ns.ca, "ca")
    async with httpx.AsyncClient(timeout=30.0, verify=verify) as http:
        await _coordinator_up(http, ns.api, ns.wait)
        token = ns.token or await credentials.issue_token(http, ns.api, ns.admin_token,
                                                          ns.device_id)  # fmt: skip
        cred = await credentials.enrol(http, ns.api, token, ns.device_id, ns.state_dir)
    print(json.dumps({**cred.public(), "state_dir": str(ns.state_dir)}))
    return 0


def main(argv: Sequence[str] | None = None, *, crash: CrashPoints | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "enrol":
        ens = build_enrol_parser().parse_args(args[1:])
        logging.basicConfig(level=getattr(logging, str(ens.log_level).upper(), logging.INFO))
        try:
            return asyncio.run(_enrol(ens))
        except FedfleetError as exc:
            print(f"fedfleet agent enrol: {exc}", file=sys.stderr)
            return 2
    predict = bool(args) and args[0] == "predict"
    if args and args[0] in ("predict", "run"):
        args = args[1:]
    ns = (build_predict_parser() if predict else build_parser()).parse_args(args)
    logging.basicConfig(
        level=getattr(logging, str(ns.log_level).upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        if predict:
            stored = credentials.load(Path(ns.state_dir)) if ns.state_dir else None
            device = ns.device_id or (stored.device_id if stored is not None else "predict")
            settings = settings_from(ns, device_id=device, inference=True)
            return asyncio.run(_predict(settings, ns.input, ns.logits))
        return asyncio.run(_run(settings_from(ns), ns.probe, crash))
    except FedfleetError as exc:  # settings, data, model, server: one line
        print(f"fedfleet agent: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
