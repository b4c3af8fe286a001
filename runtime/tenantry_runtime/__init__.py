"""Tenantry runtime: the Anthropic Messages API for tenant apps (see docs/runtime.md)."""
