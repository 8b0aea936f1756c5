"""Evaluation: measurements of trained models (FID/KID/IS, reference statistics, token metrics, prefix
curves, seed statistics) and plots; it trains nothing (training and measuring together: pipelines/)."""
