"""mlx_manager_nb: run, serve and watch local MLX language models from a Jupyter notebook."""

__version__ = "0.1.0"
