"""The query and header parameters of POST /classify, read and validated in one step.

Declared one by one in the route's signature, with the key check as a dependency, FastAPI
resolved them per request at a cost of the event loop's time that one pydantic validation does
not have (docs/performance.md, "Figures behind the code"); the checks and messages are the
same, and `openapi_parameters` still lists every parameter in the OpenAPI document.
"""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import ConfigDict, Field, ValidationError

from app.http.frontdoor import TIMEOUT_HEADER, RolloutFields, TimeoutHeaderField
from app.models.spec import RolloutParams


class _Query(RolloutFields):
    model_config = ConfigDict(extra="ignore", frozen=True)

    model: str | None = Field(
        default=None, max_length=200, description="default: the server's default model"
    )
    version: int | None = Field(default=None, ge=0, description="default: the highest")
    top_k: int | None = Field(default=None, ge=1, description="default 5, clipped to classes")
    resize: Literal["crop", "fit"] = Field(
        default="crop", description="crop: the training preprocessing; fit: keep the aspect ratio"
    )
    rollout: Literal["false", "true", "png"] = Field(
        default="false",
        description="true: add each image's attention rollout grid (runs the rollout graph); "
        "png: also a heatmap of it over the image",
    )
    timeout_ms: float | None = Field(
        default=None,
        gt=0,
        allow_inf_nan=False,
        description="this request's deadline in ms; lowers the server's, never raises it",
    )


# The header comes last: pydantic orders fields by the bases, last base first, and a 422 names
# each bad parameter in that order.
class ClassifyParams(TimeoutHeaderField, _Query):
    """What a /classify request may set besides its images; all optional."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    @property
    def rollout_params(self) -> RolloutParams | None:
        return None if self.rollout == "false" else self.to_params()

    @property
    def deadline_ms(self) -> float | None:
        """The client's own deadline: the lower of the parameter and the header."""
        given = [t for t in (self.timeout_ms, self.request_timeout_ms) if t is not None]
        return min(given, default=None)


_QUERY = tuple(name for name, field in ClassifyParams.model_fields.items() if field.alias is None)


def read_params(request: Request) -> ClassifyParams:
    """The request's parameters, or RequestValidationError naming each bad one, as FastAPI's
    own validation would (`loc` ("query", name) or ("header", name))."""
    query = request.query_params
    values: dict[str, str] = {name: query[name] for name in _QUERY if name in query}
    header = request.headers.get(TIMEOUT_HEADER)
    if header is not None:
        values[TIMEOUT_HEADER] = header
    try:
        return ClassifyParams.model_validate(values)
    except ValidationError as exc:
        errors = [
            {**e, "loc": ("header" if e["loc"][0] == TIMEOUT_HEADER else "query", *e["loc"])}
            for e in exc.errors(include_url=False)
        ]
        raise RequestValidationError(errors) from None


def openapi_parameters() -> list[dict[str, Any]]:
    """The parameters as OpenAPI describes them, from the model's JSON schema."""
    properties = ClassifyParams.model_json_schema(by_alias=True)["properties"]
    parameters = []
    for name, schema in properties.items():
        described = dict(schema)
        description = described.pop("description", "")
        parameters.append(
            {
                "name": name,
                "in": "header" if name == TIMEOUT_HEADER else "query",
                "required": False,
                "schema": described,
                "description": description,
            }
        )
    return parameters
