"""Retrieval layer: window embeddings, metrics, reference index, identification, evaluation."""
