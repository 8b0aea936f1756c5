"""Evaluation: plots of per-position quantities (and, with issue 5, FID/KID/IS and token metrics)."""
