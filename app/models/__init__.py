"""What is served: the model contract and repository, sessions on ONNX Runtime's providers,
reloads, and the model table that holds them. Imports only app.core."""
