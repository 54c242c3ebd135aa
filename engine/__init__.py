"""emnify event engine: poll emnify system events, match YAML rules, act."""

__version__ = "0.1.0"
