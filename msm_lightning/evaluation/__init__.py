"""Evaluation of frozen embeddings (never imports the model): task data, probe, metrics, protocol, score."""
