"""sdbatch: a batch runner for Stable Diffusion."""

__version__ = "0.1.0"
