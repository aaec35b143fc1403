"""Datasets: readers for captioning sources (sources.py), the embedding store (store.py), the shapes world (shapes.py).

Submodules are imported explicitly (`from clipcap.data.store import EmbeddingStore`) so that using one never pulls
the optional dependencies of another.
"""
