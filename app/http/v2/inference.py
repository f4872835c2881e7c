"""What the Open Inference Protocol's two front doors share: a request's tensors and
parameters in, the classify service, tensors out; model and server metadata.

A model takes one of two inputs: `image`, BYTES [N], each element an encoded image that the
service preprocesses with the model's own preprocessing (parameter `resize`: `crop` or `fit`);
or `patches`, UINT8 [N, grid_h, grid_w, P*P*C], grids already made as the ONNX contract lays
them out. It answers `logits` FP32 [N, classes], `probabilities` FP32 [N, classes] (softmax)
and, when asked for by name or with the parameter `rollout: true`, `rollout` FP32
[N, grid_h, grid_w] (parameters `head_fusion`, `discard_ratio`). An output asked for with the
parameter `classification: k` is answered as Triton's classification extension does: BYTES
[N, k], "score:index:label", highest first. Request parameter `timeout` (microseconds, as
tritonclient sends it) lowers the request's deadline like /classify's `timeout_ms`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import numpy as np
from numpy.typing import NDArray

from app.core.errors import InvalidInputError
from app.engine import ModelDescription, Permit
from app.http.frontdoor import rollout_params, shown
from app.http.v2.tensors import BYTES
from app.models.repository import ModelNotReadyError, UnknownModelError
from app.models.spec import HEAD_FUSIONS, RolloutParams
from app.pipeline.postprocess import top_k
from app.pipeline.preprocess import ResizePolicy
from app.pipeline.service import ClassifyService, Inference
from app.pipeline.workers import Upload

SERVER_NAME = "vit-serve"
# Extension names as Triton reports them (tritonclient reads none of them; people do).
EXTENSIONS = ("binary_tensor_data", "classification", "parameters")
PLATFORM = "onnx_onnxv1"

IMAGE = "image"
PATCHES = "patches"
LOGITS = "logits"
PROBABILITIES = "probabilities"
ROLLOUT = "rollout"
OUTPUTS = (LOGITS, PROBABILITIES, ROLLOUT)
DEFAULT_OUTPUTS = (LOGITS, PROBABILITIES)

Parameter = bool | int | float | str


def server_version() -> str:
    try:
        return metadata.version("vit-serve")
    except metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "0"


@dataclass(frozen=True)
class InputTensor:
    """One input: a numeric array, or BYTES elements."""

    name: str
    datatype: str
    shape: list[int]
    array: NDArray[Any] | None = None
    elements: list[bytes] | None = None


@dataclass(frozen=True)
class RequestedOutput:
    name: str
    parameters: Mapping[str, Parameter] = field(default_factory=dict)

    @property
    def classification(self) -> int:
        value = self.parameters.get("classification", 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InvalidInputError(
                f"output '{self.name}': parameter 'classification' must be a count of classes"
            )
        return value


@dataclass(frozen=True)
class InferRequest:
    model: str
    version: str  # "" when the request names none
    id: str
    parameters: Mapping[str, Parameter]
    inputs: list[InputTensor]
    outputs: list[RequestedOutput] | None  # None: the default outputs


@dataclass(frozen=True)
class OutputTensor:
    """One output: numeric (`array`) or BYTES (`elements`), and whether REST sends it binary."""

    name: str
    datatype: str
    shape: list[int]
    array: NDArray[Any] | None = None
    elements: list[bytes] | None = None
    parameters: Mapping[str, Parameter] = field(default_factory=dict)


@dataclass(frozen=True)
class InferResponse:
    model: str
    version: str
    id: str
    outputs: list[OutputTensor]
    requested: list[RequestedOutput]  # in the order of `outputs`


@dataclass(frozen=True)
class TensorMetadata:
    name: str
    datatype: str
    shape: list[int]  # -1: a dimension of any size


@dataclass(frozen=True)
class ModelMetadata:
    name: str
    versions: list[str]
    platform: str
    inputs: list[TensorMetadata]
    outputs: list[TensorMetadata]
    properties: dict[str, str]  # labels and preprocessing, as strings (gRPC's map<string,string>)


def parse_version(model: str, version: str) -> int | None:
    """A version from a path or a request: "" is none; anything but a number is not one."""
    if version == "":
        return None
    if not version.isdigit() or len(version) > 9:
        raise UnknownModelError(f"model '{shown(model)}' has no version '{shown(version)}'")
    return int(version)


async def _described(
    service: ClassifyService, model: str, version: str
) -> tuple[ModelDescription, int]:
    """The model and the version number a request names: the same 404 and 503 as /classify's
    for what the engine does not serve."""
    target = await service.engine.lookup(model, parse_version(model, version))
    found = service.engine.describe().model(target.name)
    if found is None:  # removed by a reload in between
        raise ModelNotReadyError(f"model '{shown(model)}' is not being served; retry")
    return found, target.version


async def model_metadata(service: ClassifyService, model: str, version: str) -> ModelMetadata:
    found, number = await _described(service, model, version)
    target = next(v for v in found.versions if v.version == number)
    arch = target.spec.architecture
    outputs = [
        TensorMetadata(LOGITS, "FP32", [-1, arch.num_classes]),
        TensorMetadata(PROBABILITIES, "FP32", [-1, arch.num_classes]),
    ]
    if target.rollout:
        outputs.append(TensorMetadata(ROLLOUT, "FP32", [-1, -1, -1]))
    return ModelMetadata(
        name=found.name,
        versions=[str(v.version) for v in found.versions],
        platform=PLATFORM,
        inputs=[
            TensorMetadata(IMAGE, BYTES, [-1]),
            TensorMetadata(PATCHES, "UINT8", [-1, -1, -1, arch.patch_dim]),
        ],
        outputs=outputs,
        properties={
            "version": str(number),
            "labels": json.dumps(target.spec.labels),
            "patch_size": str(arch.patch_size),
            "channels": str(arch.channels),
            "native_grid": f"{arch.grid[0]}x{arch.grid[1]}",
            "input_size": f"{arch.input_size[0]}x{arch.input_size[1]}",
            "max_tokens": str(found.max_tokens),
            "resize": "crop,fit",
            "preprocess": target.spec.preprocess.model_dump_json(),
            "rollout": "true" if target.rollout else "false",
            "head_fusions": ",".join(HEAD_FUSIONS),
            "max_batch_size": str(service.settings.images_per_request_max),
        },
    )


async def model_ready(service: ClassifyService, model: str, version: str) -> bool:
    """The version can take requests now: served, and the engine ready (UnknownModelError or
    ModelNotReadyError for what is not served)."""
    await _described(service, model, version)
    return service.engine.readiness().loaded


# --- a request's parameters ---------------------------------------------------------------------


def _param(params: Mapping[str, Parameter], name: str) -> Parameter | None:
    return params.get(name)


def _resize(params: Mapping[str, Parameter]) -> ResizePolicy:
    value = _param(params, "resize")
    if value is None:
        return "crop"
    if value not in ("crop", "fit"):
        raise InvalidInputError(f"parameter 'resize' must be 'crop' or 'fit', got {value!r}")
    return "crop" if value == "crop" else "fit"


def _flag(params: Mapping[str, Parameter], name: str) -> bool:
    value = _param(params, name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise InvalidInputError(f"parameter '{name}' must be true or false, got {value!r}")
    return value


def _rollout(params: Mapping[str, Parameter], wanted: bool) -> RolloutParams | None:
    return rollout_params(params) if wanted else None


def timeout_param(params: Mapping[str, Parameter]) -> float | None:
    """Request parameter `timeout`, in microseconds as tritonclient sends it, in ms."""
    value = _param(params, "timeout")
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise InvalidInputError(
            f"parameter 'timeout' must be a positive number of microseconds, got {value!r}"
        )
    return float(value) / 1e3


def _requested(request: InferRequest) -> list[RequestedOutput]:
    if request.outputs is None:
        names = [*DEFAULT_OUTPUTS, *((ROLLOUT,) if _flag(request.parameters, ROLLOUT) else ())]
        return [RequestedOutput(name) for name in names]
    seen: set[str] = set()
    for output in request.outputs:
        if output.name not in OUTPUTS:
            raise InvalidInputError(
                f"unknown output '{shown(output.name)}'; outputs: {', '.join(OUTPUTS)}"
            )
        if output.name in seen:
            raise InvalidInputError(f"output '{output.name}' is asked for twice")
        seen.add(output.name)
    return request.outputs


def _images(request: InferRequest) -> Sequence[Upload] | NDArray[np.uint8]:
    if len(request.inputs) != 1:
        names = ", ".join(f"'{shown(i.name, 40)}'" for i in request.inputs) or "none"
        raise InvalidInputError(
            f"a request takes exactly one input, '{IMAGE}' or '{PATCHES}'; got {names}"
        )
    tensor = request.inputs[0]
    if tensor.name == IMAGE:
        if tensor.datatype != BYTES or tensor.elements is None:
            raise InvalidInputError(
                f"input '{IMAGE}' must be BYTES [N], one encoded image each; "
                f"got {tensor.datatype} {tensor.shape}"
            )
        if len(tensor.shape) != 1:
            raise InvalidInputError(
                f"input '{IMAGE}' must be BYTES [N], one encoded image each; got shape "
                f"{tensor.shape}"
            )
        return [
            Upload(data=data, name=f"#{i}", content_type=None)
            for i, data in enumerate(tensor.elements, start=1)
        ]
    if tensor.name == PATCHES:
        if tensor.datatype != "UINT8" or tensor.array is None:
            raise InvalidInputError(
                f"input '{PATCHES}' must be UINT8 [N, grid_h, grid_w, P*P*C]; got "
                f"{tensor.datatype} {tensor.shape}"
            )
        return tensor.array
    raise InvalidInputError(
        f"unknown input '{shown(tensor.name, 40)}'; inputs: '{IMAGE}' (BYTES [N], encoded "
        f"images) or '{PATCHES}' (UINT8 [N, grid_h, grid_w, P*P*C])"
    )


async def infer(
    service: ClassifyService,
    permit: Permit,
    request: InferRequest,
    *,
    timeout_ms: float | None = None,
    arrived: float | None = None,
) -> InferResponse:
    """Run `request` through the service, under the request's permit."""
    requested = _requested(request)
    params = request.parameters
    wants_rollout = any(o.name == ROLLOUT for o in requested)
    rollout = _rollout(params, wants_rollout)
    images = _images(request)
    deadlines = [t for t in (timeout_ms, timeout_param(params)) if t is not None]
    rollout_output = next((o for o in requested if o.name == ROLLOUT), None)
    if rollout_output is not None and rollout_output.classification:
        raise InvalidInputError("output 'rollout' takes no 'classification' parameter")
    result = await service.infer(
        permit,
        images,
        resize=_resize(params),
        rollout=rollout,
        one_grid=wants_rollout,
        timeout_ms=min(deadlines, default=None),
        arrived=arrived,
    )
    # The labels the outputs were made with: a reload since cannot change or remove them.
    labels = result.spec.labels
    outputs = [_output(o, result, labels) for o in requested]
    return InferResponse(
        model=result.model,
        version=str(result.version),
        id=request.id,
        outputs=outputs,
        requested=requested,
    )


def _output(requested: RequestedOutput, result: Inference, labels: list[str]) -> OutputTensor:
    name = requested.name
    if name == ROLLOUT:
        maps = result.rollouts or []  # of one grid: `infer` refused others before inference
        array = np.stack(maps).astype(np.float32)
        return OutputTensor(name, "FP32", list(array.shape), array=array)
    values = result.logits if name == LOGITS else result.probs.astype(np.float32)
    k = requested.classification
    if k:
        return _classification(name, values, min(k, len(labels)), labels)
    return OutputTensor(name, "FP32", list(values.shape), array=values)


def _classification(
    name: str, values: NDArray[np.float32], k: int, labels: list[str]
) -> OutputTensor:
    """Triton's classification extension: the top k of each row as "value:index:label"."""
    rows: list[bytes] = []
    for row in values:
        rows.extend(f"{p.score:f}:{p.index}:{p.label}".encode() for p in top_k(row, k, labels))
    return OutputTensor(name, BYTES, [len(values), k], elements=rows)
