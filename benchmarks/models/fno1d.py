"""A 1-D Fourier neural operator: rfft, complex spectral weights (``torch.cfloat`` parameters), irfft,
4 layers of 32 channels and 16 modes, batch 32 of 128 points (benchmarks/results/model_styles.md).
``forward(x)`` takes the field only; ``get_example_inputs()`` ends with the target field, which reaches
``get_loss`` alone (graphs.loss_targets).
"""
import torch
from torch import nn


class Spectral(nn.Module):
    def __init__(self, channels, modes):
        super().__init__()
        self.modes = modes
        self.w = nn.Parameter(torch.randn(channels, channels, modes, dtype=torch.cfloat) / channels)

    def forward(self, x):
        xf = torch.fft.rfft(x)
        out = torch.zeros(x.shape[0], x.shape[1], x.shape[-1] // 2 + 1, dtype=torch.cfloat, device=x.device)
        out[:, :, : self.modes] = torch.einsum("bix,iox->box", xf[:, :, : self.modes], self.w)
        return torch.fft.irfft(out, n=x.shape[-1])


class FNO(nn.Module):
    def __init__(self, channels=32, modes=16, layers=4):
        super().__init__()
        self.lift = nn.Conv1d(2, channels, 1)
        self.spectral = nn.ModuleList([Spectral(channels, modes) for _ in range(layers)])
        self.pointwise = nn.ModuleList([nn.Conv1d(channels, channels, 1) for _ in range(layers)])
        self.proj = nn.Conv1d(channels, 1, 1)

    def forward(self, x):
        x = self.lift(x)
        for spectral, pointwise in zip(self.spectral, self.pointwise):
            x = nn.functional.gelu(spectral(x) + pointwise(x))
        return self.proj(x)


def get_model():
    torch.manual_seed(0)
    return FNO()


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(32, 2, 128), torch.randn(32, 1, 128))


def get_loss(out, x, target):
    return nn.functional.mse_loss(out, target)
