"""Hydra sweeper ``hydra/sweeper=optuna``: Optuna >= 5 studies shared by many workers (see sweeper.py)."""
