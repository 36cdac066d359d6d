"""A placement made real: apply it to the model, split it over processes, check its numerics,
and measure its training step (one process, or several on torch.distributed)."""
