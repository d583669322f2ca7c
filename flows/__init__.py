"""Prefect flows: thin wrappers over `magicid` functions (no science here). Locally they run without a server."""
