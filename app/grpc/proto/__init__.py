"""The Open Inference Protocol's gRPC definition (`grpc_service.proto`, from the KServe
open-inference-protocol specification, unchanged) and the stubs generated from it by
`scripts/generate-grpc-stubs` (grpcio-tools 1.81.1, mypy-protobuf 5.1.0): do not edit those by
hand."""
