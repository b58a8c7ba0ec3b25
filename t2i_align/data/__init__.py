"""Offline data: Pick-a-Pic-format preference pairs (pairs.py), streamed shuffled reading (stream.py) and their
latent/text-embedding cache (cache.py, keyed by cache_key.py)."""
from .cache import CachedPairDataset, build_or_load_cache, collate_cached
from .cache_key import cache_key, components_key_parts, encoder_key_parts, model_identity
from .pairs import PairDataset, PairStats, collate_pairs, label_problem, load_pairs, scan_corrupt
from .stream import StreamingPairSource

__all__ = ["CachedPairDataset", "PairDataset", "PairStats", "StreamingPairSource", "build_or_load_cache",
           "cache_key", "collate_cached", "collate_pairs", "components_key_parts", "encoder_key_parts",
           "label_problem", "load_pairs", "model_identity", "scan_corrupt"]
