"""The naive baseline for `bench.load`: one graph behind a plain FastAPI endpoint.

    .venv/bin/python -m bench.naive_server --repo model_repo --model demo-shapes --port 8001

The same decode/resize/patchify code as the service (`app.pipeline.preprocess.prepare`) and the same
session options, but no batcher: each request is preprocessed and run in FastAPI's thread pool
(what a plain `def` endpoint does), calling `session.run` on a batch of one. Loopback only.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import uvicorn
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool

from app.models.spec import GRAPH_FILENAME, SPEC_FILENAME, ModelSpec
from app.pipeline.postprocess import predictions
from app.pipeline.preprocess import prepare


def create_app(repo: Path, model: str, intra_op_threads: int = 0) -> FastAPI:
    spec = ModelSpec.load(repo / model / SPEC_FILENAME)
    graph = repo / model / str(max(spec.versions)) / GRAPH_FILENAME
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])
    output = spec.outputs[0].name
    fit_max_tokens = 2 * spec.architecture.native_tokens
    app = FastAPI()

    def infer(data: bytes) -> dict[str, Any]:
        image = prepare(
            data,
            spec,
            "crop",
            name="(request body)",
            max_pixels=40_000_000,
            fit_max_tokens=fit_max_tokens,
        )
        (logits,) = session.run([output], {spec.input_name: image.patches[np.newaxis]})
        top = predictions(np.asarray(logits[0], dtype=np.float32), 5, spec.labels)
        answer = [dataclasses.asdict(p) for p in top]
        return {"model": model, "results": [{"predictions": answer}]}

    @app.post("/classify")
    async def classify_route(request: Request) -> dict[str, Any]:
        data = await request.body()
        return await run_in_threadpool(infer, data)

    @app.get("/readyz")
    def readyz() -> dict[str, str]:
        return {"status": "ready"}

    return app


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repo", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--intra-op-threads", type=int, default=0)
    a = p.parse_args(argv)
    app = create_app(a.repo, a.model, a.intra_op_threads)
    uvicorn.run(app, host="127.0.0.1", port=a.port, log_level="warning", access_log=False)


if __name__ == "__main__":
    main()
