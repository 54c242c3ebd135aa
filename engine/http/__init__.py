"""The daemon's own HTTP server: health, readiness, metrics and the routes sources ask for.

`settings` is imported by the config loader, so it stays free of the web stack; `service`
holds the `HttpService` that `run` and `demo` start beside the sources.
"""
