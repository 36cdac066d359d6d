"""The placement problem and its simulation: compiled problem, optimizer state, cost model,
simulators (batched and reference), lower bound and calibration against measurement."""
