"""The JSON bodies of the Open Inference Protocol's REST API (for validation and OpenAPI)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt

# A parameter's value: the protocol allows strings, numbers and booleans.
ParameterValue = bool | int | float | str
Parameters = dict[str, ParameterValue]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ServerMetadataResponse(_Body):
    name: str
    version: str
    extensions: list[str]


class ServerLiveResponse(_Body):
    live: bool


class ServerReadyResponse(_Body):
    ready: bool


class ModelReadyResponse(_Body):
    name: str
    ready: bool


class MetadataTensor(_Body):
    name: str
    datatype: str
    shape: list[int] = Field(description="-1: a dimension of any size")


class ModelMetadataResponse(_Body):
    name: str
    versions: list[str]
    platform: str
    inputs: list[MetadataTensor] = Field(
        description="one of the two per request: `image` (BYTES [N], encoded images, "
        "preprocessed by the model's own preprocessing) or `patches` (UINT8 [N, grid_h, grid_w, "
        "P*P*C], as the ONNX contract lays them out)"
    )
    outputs: list[MetadataTensor]
    parameters: dict[str, str] = Field(
        description="labels (a JSON list, index order), patch size, native grid, preprocessing"
    )


class RequestInput(_Body):
    name: str
    shape: list[NonNegativeInt]
    datatype: str
    parameters: Parameters | None = Field(
        default=None, description="binary_data_size: the tensor's bytes after the JSON header"
    )
    data: Any = Field(default=None, description="row-major values, flat or nested")


class RequestOutput(_Body):
    name: str = Field(description="logits, probabilities or rollout")
    parameters: Parameters | None = Field(
        default=None, description="binary_data: true/false; classification: k (top k as BYTES)"
    )


class InferenceRequest(_Body):
    id: str | None = None
    parameters: Parameters | None = Field(
        default=None,
        description="resize (crop, fit), rollout (true: add the rollout output), head_fusion, "
        "discard_ratio, timeout (microseconds), binary_data_output",
    )
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(_Body):
    name: str
    shape: list[int]
    datatype: str
    parameters: Parameters | None = None
    data: list[Any] | None = None


class InferenceResponse(_Body):
    model_name: str
    model_version: str
    id: str
    outputs: list[ResponseOutput]


class ErrorResponse(_Body):
    error: str
