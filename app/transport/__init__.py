"""The HTTP server's own parts under uvicorn: the guarded httptools protocol, the connection
registry and its limits, the listener and its close."""
