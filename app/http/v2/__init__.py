"""The Open Inference Protocol (KServe V2), beside /classify: REST under /v2 and gRPC.

`protocol` is what both front doors share (tensors in, the service, tensors out); `binary`
the REST binary tensor data extension; `rest` the FastAPI routes; `grpc_server` the
`GRPCInferenceService` on its own port, in the same event loop; `proto/` the protocol's
definition and its generated stubs.
"""
