"""Evaluation of exported checkpoints: zero-shot classification, retrieval, branch analysis."""
