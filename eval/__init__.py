"""LongBench evaluation layer: task registry, data loading, metrics and per-sample PML documents.

Modules: :mod:`eval.tasks` (templates, lengths, metric names), :mod:`eval.data` (loading,
passages, truncation), :mod:`eval.metrics` (LongBench scoring), :mod:`eval.schemas` (PML text).
Imports stay lazy here so ``import eval.tasks`` needs neither rouge-score nor the PML package.
"""
