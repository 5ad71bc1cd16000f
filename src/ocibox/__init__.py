"""ocibox: Docker images without Docker."""

__version__ = "0.1.0"
