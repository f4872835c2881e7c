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


class ImageResult(_Schema):
    predictions: list[Prediction] = Field(description="sorted by score, highest first")
    image_size: tuple[int, int] = Field(description="[width, height] after EXIF orientation")
    grid: tuple[int, int] = Field(description="[grid_h, grid_w] patches the model saw")
    resize: Literal["crop", "fit"]


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


class ModelInfo(_Schema):
    name: str
    default: bool = Field(description="served when a request names no model")
    versions: list[int]
    default_version: int = Field(description="served when a request names no version")
    num_classes: int
    patch_size: int
    native_grid: tuple[int, int] = Field(description="[grid_h, grid_w] the weights were trained at")
    input_size: tuple[int, int] = Field(description="[height, width] in pixels of the native grid")
    fit_max_tokens: int = Field(description="token cap of the `fit` resize policy")
    preprocess: PreprocessInfo
    provider: str = Field(description="ONNX Runtime execution provider in use")


class ModelsResponse(_Schema):
    default_model: str
    models: list[ModelInfo]


class Status(_Schema):
    status: str


class ErrorBody(_Schema):
    detail: str
