"""deploy/helm/fedfleet stays deployable and in step with the code and the compose file.

The chart is rendered with `helm template` (default values, several replicas on external
services, the password-file store) and every manifest is checked by `kubeconform -strict`
against Kubernetes' own schemas (scripts/k8s_tools.sh builds both tools and makes the
schemas offline); then: every FEDFLEET_* / FEDFLEET_AGG_* variable is a setting of its
service and the rendered values load, the probes and scrape annotations name routes the
coordinator serves, and the chart runs the compose file's services with the compose
file's settings. Without the tools the tests skip, except under FEDFLEET_REQUIRE_REAL=1.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from aggregator.settings import ENV_PREFIX as AGG_PREFIX
from aggregator.settings import AggregatorSettings
from coordinator.api import health
from coordinator.settings import CoordinatorSettings

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "deploy" / "helm" / "fedfleet"
COMPOSE = ROOT / "deploy" / "compose" / "docker-compose.yml"
TOOLS = Path(os.environ.get("FEDFLEET_CACHE", Path.home() / ".cache" / "fedfleet")) / "k8s-tools"
VALUES = {"default": None, "ha": CHART / "ci" / "ha-values.yaml",
          "passwd": CHART / "ci" / "passwd-values.yaml"}  # fmt: skip
# what a secretKeyRef / fieldRef would give, to load the rendered settings
STAND_INS = {"FEDFLEET_REDIS_URL": "redis://:pw@redis:6379/0", "FEDFLEET_ADMIN_TOKEN": "t",
             "FEDFLEET_OPERATOR_TOKEN": "o",
             "FEDFLEET_AGG_CLIENT_ID": "ff-aggregator-0"}  # fmt: skip
# set by the chart only: the pod's name (compose replicas have no name of their own)
CHART_ONLY = {"aggregator": {"FEDFLEET_AGG_CLIENT_ID"}, "coordinator": set()}

Manifest = dict[str, Any]


def _tool(name: str) -> Path:
    path = TOOLS / "bin" / name
    if not os.access(path, os.X_OK):
        msg = f"{path} missing: run `bash scripts/k8s_tools.sh`"
        if os.environ.get("FEDFLEET_REQUIRE_REAL") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def _helm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(_tool("helm")), "template", "ff", str(CHART), *args],
                          capture_output=True, text=True, timeout=120)  # fmt: skip


@pytest.fixture(scope="module", params=list(VALUES))
def rendered(request: pytest.FixtureRequest) -> tuple[str, str]:
    values = VALUES[request.param]
    out = _helm(*(["-f", str(values)] if values else []))
    assert out.returncode == 0, out.stderr
    return request.param, out.stdout


def _docs(text: str) -> list[Manifest]:
    return [d for d in yaml.safe_load_all(text) if d]


def _workloads(text: str) -> dict[str, Manifest]:
    """component → its Deployment."""
    return {d["metadata"]["labels"]["app.kubernetes.io/component"]: d
            for d in _docs(text) if d["kind"] == "Deployment"}  # fmt: skip


def _main(dep: Manifest) -> Manifest:
    containers: list[Manifest] = dep["spec"]["template"]["spec"]["containers"]
    return next(c for c in containers if c.get("args", [None])[0] in ("coordinator", "aggregator"))


def _env(container: Manifest) -> dict[str, str]:
    return {e["name"]: e.get("value", STAND_INS.get(e["name"], "")) for e in container["env"]}


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}


def test_every_rendered_manifest_is_valid_kubernetes_strictly(rendered: tuple[str, str],
                                                               tmp_path: Path) -> None:
    _, text = rendered
    (tmp_path / "out.yaml").write_text(text)
    version = (TOOLS / "schemas" / "VERSION").read_text().strip().removeprefix("v")
    out = subprocess.run([str(_tool("kubeconform")), "-strict", "-summary", "-output", "json",
                          "-schema-location", str(TOOLS / "schemas"),
                          "-kubernetes-version", version, str(tmp_path / "out.yaml")],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr
    summary = json.loads(out.stdout)["summary"]
    assert summary["valid"] == len(_docs(text)) >= 5, summary
    assert summary["invalid"] == summary["errors"] == summary["skipped"] == 0, summary


@pytest.mark.parametrize("values", list(VALUES))
def test_helm_lint_strict_passes(values: str) -> None:
    extra = ["-f", str(VALUES[values])] if VALUES[values] else []
    out = subprocess.run([str(_tool("helm")), "lint", "--strict", str(CHART), *extra],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    assert out.returncode == 0, out.stdout + out.stderr


def test_every_variable_is_a_setting_and_the_rendered_settings_load(
    rendered: tuple[str, str],
) -> None:
    _, text = rendered
    work = _workloads(text)
    assert set(work) == {"coordinator", "aggregator"}
    for comp, cls, prefix in (("coordinator", CoordinatorSettings, "FEDFLEET_"),
                              ("aggregator", AggregatorSettings, AGG_PREFIX)):  # fmt: skip
        env = _env(_main(work[comp]))
        unknown = [k for k in env if not k.startswith(prefix)
                   or k.removeprefix(prefix).lower() not in _fields(cls)]  # fmt: skip
        assert unknown == [], (comp, unknown)
        cls.from_env(env)  # typed and consistent (ports, booleans, settings that go together)
        # the other containers (init, broker) are not configured through settings
        pod = work[comp]["spec"]["template"]["spec"]
        for c in pod["containers"] + pod.get("initContainers", []):
            if c is not _main(work[comp]):
                assert not any(e["name"].startswith("FEDFLEET_") for e in c.get("env", []))
    coord = _env(_main(work["coordinator"]))
    agg = _env(_main(work["aggregator"]))
    assert coord["FEDFLEET_AGGREGATOR_GROUP"] == agg["FEDFLEET_AGG_GROUP_ID"]
    assert coord["FEDFLEET_TOPIC_PREFIX"] == agg["FEDFLEET_AGG_TOPIC_PREFIX"]
    assert coord["FEDFLEET_KAFKA_BOOTSTRAP"] == agg["FEDFLEET_AGG_KAFKA_BOOTSTRAP"]
    assert coord["FEDFLEET_REQUIRE_ENROLMENT"] == "true"


def test_probes_and_scrape_annotations_name_what_the_services_serve(
    rendered: tuple[str, str],
) -> None:
    _, text = rendered
    work = _workloads(text)
    routes = {getattr(r, "path", None) for r in health.router.routes}
    coord = _main(work["coordinator"])
    env = _env(coord)
    ports = {p["name"]: p["containerPort"] for p in coord["ports"]}
    assert ports["http"] == int(env["FEDFLEET_HTTP_PORT"])
    scheme = "HTTPS" if env.get("FEDFLEET_TLS_CERTFILE") else "HTTP"
    probes = {k: coord[k]["httpGet"] for k in ("startupProbe", "livenessProbe", "readinessProbe")}
    assert probes["readinessProbe"]["path"] == "/readyz"  # 503 while Redis or MQTT is down
    assert probes["livenessProbe"]["path"] == "/healthz"
    for probe in probes.values():
        assert probe["path"] in routes and probe["port"] == "http" and probe["scheme"] == scheme
    notes = work["coordinator"]["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/path"] in routes
    assert int(notes["prometheus.io/port"]) == ports["http"]
    assert notes["prometheus.io/scheme"] == scheme.lower()
    # the aggregator serves Prometheus text on metrics_port and nothing else: no probes
    agg = _main(work["aggregator"])
    assert not any(k.endswith("Probe") for k in agg)
    agg_notes = work["aggregator"]["spec"]["template"]["metadata"]["annotations"]
    assert agg_notes["prometheus.io/port"] == _env(agg)["FEDFLEET_AGG_METRICS_PORT"]
    for dep in work.values():
        for c in dep["spec"]["template"]["spec"]["containers"]:
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]


def _compose_settings(service: Manifest) -> dict[str, str]:
    """A compose service's settings: its environment plus its command's --flags."""
    env = {k: str(v) for k, v in service.get("environment", {}).items()}
    cmd = service["command"]
    for flag, value in zip(cmd[1::2], cmd[2::2], strict=True):
        env["FEDFLEET_" + flag.removeprefix("--").replace("-", "_").upper()] = value
    return env


def test_the_compose_file_stays_in_step_with_the_chart() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())["services"]
    out = _helm("-f", str(VALUES["passwd"]))  # compose's shape: the broker beside the coordinator
    assert out.returncode == 0, out.stderr
    work = _workloads(out.stdout)
    ours = {name: s for name, s in compose.items() if name != "init"
            and s.get("build", {}).get("dockerfile") == "deploy/Dockerfile"}  # fmt: skip
    # the same fedfleet services, each running the same subcommand
    assert {s["command"][0] for s in ours.values()} == set(work) == {"coordinator", "aggregator"}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    # the compose file's servers are the chart's external services (the broker: in the pod)
    assert {"kafka", "mosquitto", "redis"} <= set(compose)
    assert {"kafka", "mqtt", "redis"} <= set(values)
    for name, service in ours.items():
        comp = service["command"][0]
        chart = _env(_main(work[comp]))
        theirs = _compose_settings(service)
        assert set(chart) - CHART_ONLY[comp] == set(theirs), name
        # the files sit where compose mounts them (the broker config and init agree on them)
        for key, value in theirs.items():
            if value.startswith("/"):
                assert chart[key] == value, key
    pod = work["coordinator"]["spec"]["template"]["spec"]
    broker = next(c for c in pod["containers"] if c["name"] == "mosquitto")
    assert broker["image"] == compose["mosquitto"]["image"]
    pidfile = _env(_main(work["coordinator"]))["FEDFLEET_MQTT_BROKER_PIDFILE"]
    assert pidfile in " ".join(broker["command"]) and pidfile in " ".join(
        compose["mosquitto"]["entrypoint"])
    assert "$$$$" in " ".join(broker["command"])  # Kubernetes, like compose, turns $$ into $
    assert pod["shareProcessNamespace"] is True and compose["coordinator"]["pid"] == (
        "service:mosquitto")
    conf = (ROOT / "deploy" / "mosquitto" / "mosquitto.conf").read_text()
    assert (CHART / "files" / "mosquitto.conf").read_text() == conf
    cm = next(d for d in _docs(out.stdout) if d["kind"] == "ConfigMap")
    assert cm["data"]["mosquitto.conf"].strip() == conf.strip()


def test_several_coordinators_share_one_subscription_group_and_aggregators_one_volume() -> None:
    out = _helm("-f", str(VALUES["ha"]))
    assert out.returncode == 0, out.stderr
    work = _workloads(out.stdout)
    coord, agg = work["coordinator"], work["aggregator"]
    assert coord["spec"]["replicas"] == 4 and agg["spec"]["replicas"] == 8
    env = _env(_main(coord))
    settings = CoordinatorSettings.from_env(env)
    assert settings.share_group == "coord-prod"
    assert settings.mqtt_passwd_file is None  # dynsec: no broker files to share between pods
    claims = {d["metadata"]["name"]: d for d in _docs(out.stdout)
              if d["kind"] == "PersistentVolumeClaim"}  # fmt: skip
    for dep in (coord, agg):  # one claim every replica mounts, ReadWriteMany
        (vol,) = [v for v in dep["spec"]["template"]["spec"]["volumes"]
                  if "persistentVolumeClaim" in v]  # fmt: skip
        claim = claims[vol["persistentVolumeClaim"]["claimName"]]
        assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert _env(_main(agg))["FEDFLEET_AGG_CHECKPOINT_DIR"].startswith("/data/")
    pdb = [d for d in _docs(out.stdout) if d["kind"] == "PodDisruptionBudget"]
    assert len(pdb) == 1


def test_the_password_file_store_refuses_several_coordinators() -> None:
    out = _helm("--set", "mqtt.credentialStore=passwd", "--set", "coordinator.replicas=2")
    assert out.returncode != 0 and "one replica" in out.stderr
    out = _helm("--set", "mqtt.credentialStore=plugin")
    assert out.returncode != 0 and "dynsec or passwd" in out.stderr
