"""deploy/grafana's dashboard queries only metrics the services register, through the
datasource its provisioning defines, on the Prometheus that scrapes the compose services."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml
from prometheus_client import CollectorRegistry

from aggregator.metrics import AggregatorMetrics
from coordinator.metrics import CoordinatorMetrics

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
DASHBOARD = DEPLOY / "grafana" / "dashboards" / "fedfleet.json"
PROVISIONING = DEPLOY / "grafana" / "provisioning"
KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "atan2", "group_left",
            "group_right"}
SUFFIXES = {"counter": ("_total", "_created"), "gauge": ("",),
            "histogram": ("_bucket", "_sum", "_count", "_created")}  # fmt: skip


def exposed_names() -> set[str]:
    """Every sample name the coordinator's and an aggregator's registries can expose
    (prometheus_client: a counter ``x`` is ``x_total``, a histogram ``x_bucket``, ...)."""
    registries = [CoordinatorMetrics(CollectorRegistry()).registry, AggregatorMetrics().registry]
    return {family.name + suffix for reg in registries for family in reg.collect()
            for suffix in SUFFIXES[family.type]}  # fmt: skip


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers left once strings, label
    matchers, ranges, grouping clauses and Grafana variables are cut, that call nothing."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\{[^}]*\}|\$\w+", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.])[A-Za-z_:][\w:]*", e):
        if e[m.end():].lstrip().startswith("(") or m.group().lower() in KEYWORDS:
            continue  # a function or an aggregation operator
        names.add(m.group())
    return names


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in node.get("panels", []):
        yield p
        yield from _panels(p)


def _dashboard() -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return doc


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose" / "docker-compose.yml").read_text())
    services: dict[str, Any] = doc["services"]
    return services


def test_the_promql_reader_finds_metric_names_and_nothing_else() -> None:
    expr = ('histogram_quantile(0.99, sum by (le, job) (rate(a_bucket{reason=~"x|y"}[5m]))) '
            "/ on (job) group_left sum without (shard) (b_total offset 1h) * 1e-3 > bool "
            "max(c) and d{x=\"sum(e)\"}[$__rate_interval]")  # fmt: skip
    assert metric_names(expr) == {"a_bucket", "b_total", "c", "d"}


def test_every_dashboard_query_names_a_registered_metric() -> None:
    known = exposed_names()
    assert "fedfleet_coord_tasks_issued_total" in known  # the registries were read
    used: set[str] = set()
    for panel in _panels(_dashboard()):
        for target in panel.get("targets", []):
            names = metric_names(target["expr"])
            assert names, (panel["title"], target["expr"])
            assert names <= known, (panel["title"], sorted(names - known))
            used |= names
    # the views the dashboard is for: fleet state, ingest lag, tasks issued/expired,
    # updates/s, staleness, federated accuracy, rejects by reason
    for name in ("fedfleet_coord_training_now", "fedfleet_coord_mqtt_messages_total",
                 "fedfleet_aggregator_partition_lag", "fedfleet_coord_tasks_issued_total",
                 "fedfleet_coord_tasks_expired_total", "fedfleet_aggregator_updates_applied_total",
                 "fedfleet_aggregator_staleness_bucket", "fedfleet_coord_fed_accuracy",
                 "fedfleet_coord_rejected_total", "fedfleet_aggregator_updates_rejected_total"):
        assert name in used, name


def test_the_dashboard_is_provisioned_from_the_prometheus_of_the_compose_file() -> None:
    (source,) = yaml.safe_load((PROVISIONING / "datasources" / "prometheus.yml").read_text())[
        "datasources"]
    uids = {p["datasource"]["uid"] for p in _panels(_dashboard()) if "datasource" in p}
    uids |= {t["datasource"]["uid"] for p in _panels(_dashboard()) for t in p.get("targets", [])}
    assert uids == {source["uid"]}
    assert source["url"] == "http://prometheus:9090"
    services = _compose()
    (provider,) = yaml.safe_load((PROVISIONING / "dashboards" / "fedfleet.yml").read_text())[
        "providers"]
    mounts = dict(v.rsplit(":", 2)[:2] for v in services["grafana"]["volumes"])
    assert mounts["../grafana/dashboards"] == provider["options"]["path"]
    assert mounts["../grafana/provisioning"] == "/etc/grafana/provisioning"


def test_prometheus_scrapes_the_ports_the_compose_services_serve_metrics_on() -> None:
    services = _compose()
    jobs = {j["job_name"]: j for j in yaml.safe_load(
        (DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]}  # fmt: skip
    coord = services["coordinator"]
    port = coord["command"][coord["command"].index("--http-port") + 1]
    (target,) = jobs["fedfleet-coordinator"]["static_configs"][0]["targets"]
    assert target == f"coordinator:{port}"
    assert (jobs["fedfleet-coordinator"]["scheme"] == "https") == (
        "FEDFLEET_TLS_CERTFILE" in coord["environment"])
    ca = jobs["fedfleet-coordinator"]["tls_config"]["ca_file"]
    assert ca == coord["environment"]["FEDFLEET_MQTT_CAFILE"]  # the fleet CA, mounted
    assert "fleet:/fleet:ro" in services["prometheus"]["volumes"]
    (sd,) = jobs["fedfleet-aggregator"]["dns_sd_configs"]
    assert sd["names"] == ["aggregator"]
    assert str(sd["port"]) == services["aggregator"]["environment"]["FEDFLEET_AGG_METRICS_PORT"]
