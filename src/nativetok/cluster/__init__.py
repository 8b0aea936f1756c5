"""Cluster job submission: sbatch scripts rendered from a template in the repository."""
