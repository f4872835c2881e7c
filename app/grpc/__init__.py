"""The Open Inference Protocol over gRPC: the server and its generated stubs."""
