"""The package version, recorded in every output and in the resume signature."""

__version__ = "0.1.0"
