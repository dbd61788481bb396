"""Evaluation: pure-numpy retrieval metrics and ``evaluate_run``."""
