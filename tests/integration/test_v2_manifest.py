"""deploy/kserve/inferenceservice.yaml: its pod is valid Kubernetes, and it probes the
Open Inference Protocol's health routes, which the service has."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from app.http.v2.rest import router
from tests.support import ROOT

MANIFEST = ROOT / "deploy" / "kserve" / "inferenceservice.yaml"
# The predictor's fields that KServe adds to a PodSpec (its ComponentExtensionSpec).
KSERVE_FIELDS = {"minReplicas", "maxReplicas", "scaleTarget", "scaleMetric", "canaryTrafficPercent"}


def manifest() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return doc


def test_the_predictor_is_a_valid_pod_spec() -> None:
    validate = pytest.importorskip("kubernetes_validate", reason="pip install kubernetes-validate")
    doc = manifest()
    assert (doc["apiVersion"], doc["kind"]) == ("serving.kserve.io/v1beta1", "InferenceService")
    spec = {k: v for k, v in doc["spec"]["predictor"].items() if k not in KSERVE_FIELDS}
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"}, "spec": spec}
    version = validate.latest_version()
    validate.validate(pod, version, strict=True)
    spec["containers"][0]["readinessProbe"]["periodSecond"] = 2  # the validator is not a no-op
    with pytest.raises(validate.ValidationError):
        validate.validate(pod, version, strict=True)


def test_it_probes_routes_the_service_has() -> None:
    (container,) = manifest()["spec"]["predictor"]["containers"]
    routes = {getattr(r, "path", "") for r in router.routes}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] in routes
        assert container[probe]["httpGet"]["port"] == container["ports"][0]["containerPort"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["VIT_SERVE_HOST"] == "0.0.0.0"
