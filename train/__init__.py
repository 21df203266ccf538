"""jaxenc training entry points (run from the repository root)."""
