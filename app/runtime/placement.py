"""Which providers, with which options, each graph gets on this machine.

TensorRT, CUDA, CPU, as far as the driver, the libraries each provider links against and this
ONNX Runtime build allow (`candidate_providers`); the provider it would get were every library
there (`wanted_provider`), and why each GPU provider cannot run here (`provider_problem`).
"""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass, field

import onnxruntime as ort

from app.core.settings import Settings
from app.models.repository import ModelVersion
from app.runtime import native
from app.runtime import providers as prov
from app.runtime.backends import RuntimeLoadError
from app.runtime.providers import (
    CPU,
    CUDA,
    GPU_PROVIDERS,
    TENSORRT,
    EnginePlatform,
    Profile,
    TensorrtConfig,
)

log = logging.getLogger(__name__)


def _cuda_driver_present() -> bool:
    # onnxruntime-gpu lists the CUDA and TensorRT providers on every machine and, without a
    # driver, prints a page of errors before falling back; a missing libcuda settles it quietly.
    return native.driver_present()


@functools.cache
def _preloaded() -> None:
    """NVIDIA's CUDA and cuDNN wheels loaded where they help (`native.preload_nvidia_wheels`),
    once per process, before any provider is probed."""
    native.preload_nvidia_wheels()


def provider_problem(provider: str) -> str | None:
    """Why a GPU provider cannot run here: no driver, or a library its provider library links
    against (at the SONAME it links against) that loads neither from the loader's path nor from
    NVIDIA's wheels; None where every one loads (and is now loaded), or for the CPU."""
    if provider not in GPU_PROVIDERS:
        return None
    if not _cuda_driver_present():
        return f"no NVIDIA driver ({native.DRIVER} does not load)"
    _preloaded()
    libraries = native.tensorrt_provider() if provider == TENSORRT else native.cuda_provider()
    return libraries.reason()


def _tensorrt_libraries_present() -> bool:
    # Every library TensorRT's provider links against (libnvinfer, libnvonnxparser, cuDNN,
    # cuBLAS, ...), at its SONAME: an image without them would fail each session's TensorRT.
    return provider_problem(TENSORRT) is None


def _cuda_libraries_present() -> bool:
    return provider_problem(CUDA) is None


def candidate_providers(requested: list[str] | None, takes_tensorrt: bool = False) -> list[str]:
    """The providers to try for a graph, best first; CPU is always the last resort.

    Without an explicit list: TensorRT, CUDA, CPU, as far as the driver, the libraries and
    this ONNX Runtime build allow. TensorRT only for a graph that `takes_tensorrt`
    (`app.runtime.providers.takes_tensorrt`) and whose session is given TensorRT's options
    (`execution_plan`): without explicit profiles it would rebuild its engine per new grid.
    """
    available = ort.get_available_providers()
    if requested is not None:
        unknown = [p for p in requested if p not in available]
        if unknown:
            log.warning("providers %s are not in this ONNX Runtime build (%s)", unknown, available)
    gpu_build = bool(GPU_PROVIDERS & set(available))
    driver = gpu_build and _cuda_driver_present()
    auto = requested is None
    return prov.candidate_providers(
        requested,
        available,
        driver=driver,
        tensorrt_libraries=auto and takes_tensorrt and driver and _tensorrt_libraries_present(),
        takes_tensorrt=takes_tensorrt,
        cuda_libraries=auto and driver and _cuda_libraries_present(),
    )


def wanted_provider(requested: list[str] | None, takes_tensorrt: bool) -> str:
    """The provider a graph would get on a machine where every library of this ONNX Runtime
    build loads: what a session is measured against when it lands elsewhere."""
    available = ort.get_available_providers()
    return prov.candidate_providers(
        requested, available, driver=True, tensorrt_libraries=True, takes_tensorrt=takes_tensorrt
    )[0]


def engine_platform() -> EnginePlatform:
    """The versions and GPU a TensorRT engine built now is for (part of its cache key)."""
    gpu = native.gpu()
    return EnginePlatform(
        onnxruntime=ort.__version__,
        tensorrt=native.tensorrt_version(),
        gpu=gpu.name if gpu is not None else None,
        capability=gpu.capability if gpu is not None else None,
    )


@dataclass(frozen=True)
class ExecutionPlan:
    """How one graph of one version is to be run: providers with their options."""

    providers: list[str]
    options: dict[str, dict[str, str]]
    profile: Profile | None  # TensorRT's, where TensorRT is offered
    optimization: str  # the graph's form, from model.json
    # What the graph would run on were every library there (`wanted_provider`), and why the
    # GPU providers that are not offered or will fail cannot run here.
    wanted: str = CPU
    problems: dict[str, str] = field(default_factory=dict)

    def describe(self, provider: str) -> str:
        """For the log line of a loaded graph: the provider in use and what matters of it."""
        shown = prov.options_shown(provider, self.options)
        return f"{provider} ({shown})" if shown else provider


def execution_plan(settings: Settings, version: ModelVersion, rollout: bool) -> ExecutionPlan:
    """Providers and options for a version's plain (`rollout` False) or rollout graph."""
    spec = version.spec
    files = spec.versions.get(version.version)
    level = prov.graph_form(spec, version.version)
    takes = prov.takes_tensorrt(level, rollout)
    providers = candidate_providers(settings.providers, takes)
    if prov.cpu_only(level, rollout) and GPU_PROVIDERS.intersection(providers):
        # Not served beside a GPU: the version is listed as not ready with this reason, and a
        # model's default falls to its highest version that serves (an fp32 one).
        raise RuntimeLoadError(
            f"its graph is int8, a CPU form, and this replica offers {providers[0]}: serve an "
            "fp32 version here, or set VIT_SERVE_PROVIDERS='[\"CPUExecutionProvider\"]'"
        )
    wanted = wanted_provider(settings.providers, takes)
    gpu_wanted = [p for p in dict.fromkeys([wanted, *providers]) if p in GPU_PROVIDERS]
    problems = {p: why for p in gpu_wanted if (why := provider_problem(p)) is not None}
    tensorrt = None
    profile = None
    if TENSORRT in providers and files is not None:
        arch = spec.architecture
        profile = prov.served_profile(
            arch,
            settings.fit_max_tokens or 2 * arch.native_tokens,
            settings.max_batch_size,
            settings.batch_tokens(gpu=True),
        )
        key = prov.tensorrt_options_key(profile, settings.trt_fp16, engine_platform())
        tensorrt = TensorrtConfig(
            input_name=spec.input_name,
            profile=profile,
            fp16=settings.trt_fp16,
            cache_root=settings.trt_cache_dir,
            engine_dir=prov.engine_cache_dir(
                settings.trt_cache_dir, spec.name, version.version, files.model, key
            ),
        )
    options = prov.provider_options(providers, tensorrt, cuda_tf32=settings.cuda_tf32)
    return ExecutionPlan(providers, options, profile, level, wanted, problems)
