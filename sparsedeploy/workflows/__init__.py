"""Workflows: loops over the stages (run, sweep). The CLI parses arguments, calls one, and prints its result."""
