"""Hydra launchers of the suite: submitit's SLURM launcher that cancels its jobs when interrupted (slurm.py)."""
