"""ONNX Runtime: sessions, IO binding, which providers a graph gets and where it runs."""
