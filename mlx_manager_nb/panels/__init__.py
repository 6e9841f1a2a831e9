"""The ipywidgets panels behind :mod:`mlx_manager_nb.widgets`, one module each."""
