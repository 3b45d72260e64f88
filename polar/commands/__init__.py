"""Subcommands of the polar CLI, one module each."""
