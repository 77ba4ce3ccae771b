"""sdbatch: a batch runner for Stable Diffusion.

The Python API (see README "Python"): `run` a manifest, DataFrame or list of dicts;
`Generator` keeps one model warm for txt2img, img2img and image prompts.
"""

__version__ = "0.1.0"

from .api import Generator, Result, run  # noqa: E402  (after __version__, which the API's modules read)

__all__ = ["Generator", "Result", "__version__", "run"]
