"""The web console at `/ui` (and the JSON API its pages use at `/api/...`): what the engine
saw and decided, and the few buttons an operator on call needs (retry, discard, resume).

An adapter: it is mounted by the daemon's HTTP server and reads through the same data
functions the `status`, `why` and `dead-letters` commands use, so a page and a command never
disagree about what the store holds.
"""
