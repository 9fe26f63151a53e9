"""The runners over MLX (mlx-lm, mlx-vlm, mlx-embeddings) and the GGUF to MLX converter.

Each module imports MLX lazily: the registry names them by string (``runners/registry.py``).
"""
