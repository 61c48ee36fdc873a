"""Evaluation: the FreiHAND protocol, evaluate and demo modes, baselines, equivariance, figures."""
