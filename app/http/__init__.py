"""The HTTP layer: routes, schemas, errors to statuses, uploads, access keys, the page, the
request middleware and Prometheus metrics."""
