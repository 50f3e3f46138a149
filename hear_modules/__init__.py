"""HEAR API modules over msm-lightning models."""
