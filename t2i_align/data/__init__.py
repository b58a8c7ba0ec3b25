"""Offline data: Pick-a-Pic-format preference pairs (pairs.py) and their latent/text-embedding cache (cache.py)."""
from .cache import CachedPairDataset, build_or_load_cache, cache_key, collate_cached, model_identity
from .pairs import PairDataset, PairStats, collate_pairs, load_pairs, scan_corrupt

__all__ = ["CachedPairDataset", "PairDataset", "PairStats", "build_or_load_cache", "cache_key", "collate_cached",
           "collate_pairs", "load_pairs", "model_identity", "scan_corrupt"]
