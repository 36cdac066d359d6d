"""A spectrally normalised discriminator (SN-GAN style): torch.nn.utils.parametrizations.spectral_norm
(benchmarks/results/model_styles.md, "Sixth round"). torch refuses to pickle a parametrized module, so
before `7265ab6` every pipeline and DDP of it failed to reach its worker processes.
"""
import torch
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm


def get_model():
    return nn.Sequential(
        spectral_norm(nn.Linear(64, 128)), nn.LeakyReLU(0.2),
        spectral_norm(nn.Linear(128, 128)), nn.LeakyReLU(0.2),
        spectral_norm(nn.Linear(128, 1)),
    )


def get_example_inputs():
    return (torch.randn(32, 64), torch.randint(0, 2, (32,)).float())


def get_loss(output, x, y):
    return nn.functional.binary_cross_entropy_with_logits(output.squeeze(1), y)
