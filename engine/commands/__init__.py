"""CLI commands that live in their own modules (listed in `engine.cli._COMMAND_MODULES`)."""
