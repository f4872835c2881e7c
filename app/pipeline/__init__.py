"""The request path without HTTP: preprocessing, batching, postprocessing, rollout maps and the
classify service that runs them on the model table."""
