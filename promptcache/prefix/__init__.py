"""Automatic prefix caching: a radix tree of token sequences holding KV segments.

:mod:`.radix` is the tree, :mod:`.eviction` its policies, :mod:`.analyze` estimates what
prefix caching would save on a batch of prompts without running a model.
"""

from .analyze import AnalysisReport, analyze, analyze_main
from .eviction import EvictionPolicy, LFUPolicy, LRUPolicy, TTLPolicy, make_policy
from .radix import (InsertResult, MatchResult, PrefixCacheError, RadixNode, RadixTree, TreeStats,
                    sequence_split)

__all__ = [
    "AnalysisReport", "analyze", "analyze_main",
    "EvictionPolicy", "LFUPolicy", "LRUPolicy", "TTLPolicy", "make_policy", "InsertResult",
    "MatchResult", "PrefixCacheError", "RadixNode", "RadixTree", "TreeStats", "sequence_split",
]
