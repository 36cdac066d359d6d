"""A model becomes a computation graph: model files, capture, the placement graph, profiling, FLOPs, grouping, the zoo."""
