"""Datasets: readers for captioning sources (sources.py), predictions and references to score (references.py), the
embedding store (store.py) and the tokenised training pairs (pairs.py).

Submodules are imported explicitly (`from clipcap.data.store import EmbeddingStore`) so that using one never pulls
the optional dependencies of another.
"""
