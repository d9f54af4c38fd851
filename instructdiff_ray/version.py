"""The package version (a leaf: modules that need it import it from here, not from the package)."""

__version__ = "0.1.0"
