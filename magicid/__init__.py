"""MagicID: identity-faithful portrait and group-photo generation.

Importing the package has no side effects (no directories made, no tracking URIs set, no engines).
"""

__version__ = "0.1.0"
