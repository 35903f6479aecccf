"""Evaluation: click simulation, IoU / boundary IoU / NoC metrics and their aggregation (spec §10).

`sum.eval.metrics` holds the metrics and the per-dataset / per-task / overall means of spec §10.2;
`sum.eval.clicker` the deterministic click simulator of spec §10.3. Both are pure functions on
numpy arrays, without I/O.
"""
