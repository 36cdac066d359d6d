"""The stand-in model the link-measuring job loads (the ``links`` task uses no model)."""

import torch


def get_model() -> torch.nn.Module:
    return torch.nn.Linear(1, 1)


def get_example_inputs() -> tuple:
    return (torch.zeros(1, 1),)
