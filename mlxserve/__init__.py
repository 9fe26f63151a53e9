"""mlxserve: the daemon and the inference core (runners, prompts, scheduling)."""

__version__ = "0.1.0"

from mlxserve import platform as _platform

_platform.BlasBeforeMlx.install()  # MLX's CPU backend on an optimized BLAS, when MLX loads
