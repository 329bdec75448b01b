"""Maintenance scripts for this repository (run from its root as `python -m tools.<name>`); not part of the package."""
