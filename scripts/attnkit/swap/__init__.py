"""Applying a backend to a model, with a way back; never measuring it.

``switch`` is the one entry point (transformers' ``attn_implementation``, or the run-time
swaps of hand-written attention). Hand-written sites come in three parts: ``scan`` reads
source (no import), ``live`` swaps at run time, ``patch`` writes the source change. The
proof that a swap worked belongs to ``measure.verify`` and the steps.
"""
