"""The GPU deployments ask for a GPU: VIT_SERVE_REQUIRE_GPU in the compose file's GPU replicas
and the Kubernetes Deployment (GPU nodes), never in the CPU variant."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from app.core.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def require_gpu(env: dict[str, str]) -> bool:
    named = {k.removeprefix("VIT_SERVE_").lower(): v for k, v in env.items()}
    return Settings.model_validate({"require_gpu": named.get("require_gpu", "false")}).require_gpu


def test_the_compose_files_gpu_replicas_require_a_gpu_and_the_cpu_ones_do_not() -> None:
    services: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    gpu, cpu = services["vit-serve"], services["vit-serve-cpu"]
    assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["driver"] == "nvidia"
    assert require_gpu(gpu["environment"])
    assert not require_gpu(cpu["environment"])
    # The GPU replicas keep every other setting the CPU ones have, but their front ends: many
    # beside the engine process on a GPU, one process on a CPU.
    own = ("VIT_SERVE_REQUIRE_GPU", "VIT_SERVE_WORKERS")
    assert {k: v for k, v in gpu["environment"].items() if k not in own} == {
        k: v for k, v in cpu["environment"].items() if k not in own
    }
    assert int(gpu["environment"]["VIT_SERVE_WORKERS"]) > 1
    assert cpu["environment"]["VIT_SERVE_WORKERS"] == "1"


def test_the_kubernetes_deployment_on_gpu_nodes_requires_a_gpu() -> None:
    deployment = yaml.safe_load((ROOT / "deploy" / "k8s" / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert require_gpu({e["name"]: e["value"] for e in container["env"]})
