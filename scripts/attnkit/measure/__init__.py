"""Measuring a backend: what ran, how long, how much memory, how many FLOPs, how accurate.

``kernels`` reads the profiler's evidence, ``timing`` measures one backend (latency,
peak memory, kernels), ``flops`` counts useful work, ``accuracy`` judges outputs against a
float64 reference, ``verdicts`` turns two measurements into checks, ``verify`` proves a
hand-written attention swap site by site; ``distributed`` gathers per-rank figures of a
run on N processes, ``context_parallel`` runs attention sharded by torch's context
parallel API. It may apply a candidate through ``swap``;
``swap`` never imports it.
"""
