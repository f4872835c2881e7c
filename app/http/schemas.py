"""Response bodies of the HTTP API (pydantic models, so they appear in the OpenAPI document)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Schema(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class Prediction(_Schema):
    label: str
    index: int = Field(description="class index in the model's labels")
    score: float = Field(description="softmax probability")


class Rollout(_Schema):
    grid: list[list[float]] = Field(
        description="grid_h rows of grid_w values: the class token's rolled-out attention to "
        "each patch (Abnar & Zuidema 2020), scaled so the largest is 1"
    )
    head_fusion: Literal["mean", "max", "min"] = Field(description="how each block's heads fused")
    discard_ratio: float = Field(description="fraction of the lowest attentions zeroed per block")
    heatmap_png: str | None = Field(
        default=None,
        description="only with rollout=png: a base64 PNG of the map blended over the image, at "
        "its size after EXIF orientation (with resize=crop, over the centre crop only)",
    )


class ImageResult(_Schema):
    predictions: list[Prediction] = Field(description="sorted by score, highest first")
    image_size: tuple[int, int] = Field(description="[width, height] after EXIF orientation")
    grid: tuple[int, int] = Field(description="[grid_h, grid_w] patches the model saw")
    resize: Literal["crop", "fit"]
    rollout: Rollout | None = Field(default=None, description="only with rollout=true or png")


class Timing(_Schema):
    preprocess_ms: float
    inference_ms: float = Field(description="queueing and running, until the last image")
    total_ms: float


class ClassifyResponse(_Schema):
    model: str
    version: int
    results: list[ImageResult] = Field(description="one per image, in the order sent")
    timing: Timing


class PreprocessInfo(_Schema):
    resize_mode: Literal["shorter_side", "squash"]
    crop_pct: float
    interpolation: str


class DecodeInfo(_Schema):
    where: Literal["gpu", "cpu"] = Field(
        description="where the default version's JPEGs are decoded: gpu, on the device in the "
        "engine (VIT_SERVE_DECODE); cpu, in the front ends' threads"
    )
    decoder: str = Field(description="what decodes on the device, or why nothing does")
    images: dict[str, int] = Field(
        default_factory=dict,
        description="images decoded so far by this replica, by 'path/reason' (e.g. gpu/jpeg, "
        "cpu/progressive, cpu/refused); the same counts as vit_serve_decode_images_total",
    )


class ModelInfo(_Schema):
    name: str
    default: bool = Field(description="served when a request names no model")
    versions: list[int]
    default_version: int = Field(description="served when a request names no version")
    rollout_versions: list[int] = Field(
        description="versions with a rollout graph: these can answer rollout=true or png"
    )
    num_classes: int
    patch_size: int
    backbone: str | None = Field(
        default=None,
        description="hybrids (paper §3.1): the CNN whose feature-map cells are the tokens; "
        "patch_size is then its total stride",
    )
    native_grid: tuple[int, int] = Field(description="[grid_h, grid_w] the weights were trained at")
    input_size: tuple[int, int] = Field(description="[height, width] in pixels of the native grid")
    fit_max_tokens: int = Field(description="token cap of the `fit` resize policy")
    preprocess: PreprocessInfo
    decode: DecodeInfo
    provider: str = Field(
        description="the ONNX Runtime execution provider that runs the default version's graph: "
        "the one ONNX Runtime assigned most of its matrix products and attention to, read from "
        "its node assignment (not the providers it was offered)"
    )
    placement: dict[str, int] = Field(
        default_factory=dict,
        description="nodes of the graph ONNX Runtime assigned to each provider (shape arithmetic "
        "stays on the CPU on any provider); empty where it keeps no record",
    )
    wanted_provider: str = Field(
        default="",
        description="the provider the service wanted for the graph (TensorRT, CUDA, CPU: the "
        "best this ONNX Runtime build has for its form)",
    )
    fallback: str | None = Field(
        default=None,
        description="why the graph runs on `provider` rather than `wanted_provider` (driver, "
        "libraries, a failed engine build...); null when it runs where wanted",
    )
    optimization: Literal["none", "fused", "fp16", "int8"] = Field(
        default="none",
        description="the default version's graph form (model.json versions.<n>.optimization): "
        "none as traced (what TensorRT takes), fused with ONNX Runtime's operators, fp16, int8 "
        "(int8 matrix products, past an accuracy gate at export)",
    )
    version_optimization: dict[int, Literal["none", "fused", "fp16", "int8"]] = Field(
        default_factory=dict, description="each version's graph form (fp32 and int8 side by side)"
    )
    tensorrt_fp16: bool | None = Field(
        default=None,
        description="on TensorRT: whether it may run layers in float16; null on other providers",
    )


class NotReady(_Schema):
    model: str
    version: int | None = Field(description="null: the whole model (its model.json)")
    reason: str


class ModelsResponse(_Schema):
    default_model: str | None = Field(description="null only when the repository is empty")
    models: list[ModelInfo] = Field(description="models with at least one version serving")
    not_ready: list[NotReady] = Field(
        description="models and versions in the repository that cannot serve, and why; their "
        "requests get 503 (the other models keep serving)"
    )
    replica_not_ready: str | None = Field(
        default=None,
        description="why GET /readyz answers 503 although models serve: VIT_SERVE_REQUIRE_GPU is "
        "set and sessions that should run on a GPU landed on the CPU; null otherwise",
    )


class ReloadResponse(_Schema):
    loaded: list[str] = Field(description="'name/version' new or changed, loaded and warmed")
    unloaded: list[str] = Field(description="gone from the repository: drained and released")
    unchanged: list[str]
    failed: list[NotReady] = Field(
        description="could not be loaded; a version that served before goes on serving"
    )


class Status(_Schema):
    status: str


class ErrorBody(_Schema):
    detail: str
