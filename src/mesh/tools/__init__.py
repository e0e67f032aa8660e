"""Operator tools: the local supervisor, manifest checks, load generation."""
