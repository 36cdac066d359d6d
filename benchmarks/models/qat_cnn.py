"""Quantization-aware training: a small CNN prepared with torch.ao.quantization.prepare_qat, whose
per-channel observers size their buffers on the first call (benchmarks/results/model_styles.md,
"Fifth round"). Every placement measured over cpu:0,cpu:1 failed before `49cbfa7` and `4037313`
(the trial forward left the buffers resized: another fingerprint than the workers'; then copy_ could
not put them back).
"""
import torch
import torch.ao.quantization as tq
import torch.nn.functional as F
from torch import nn


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.quant = tq.QuantStub()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.r1 = nn.ReLU()
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.r2 = nn.ReLU()
        self.fc = nn.Linear(32, 10)
        self.dequant = tq.DeQuantStub()

    def forward(self, x):
        h = self.r2(self.c2(self.r1(self.c1(self.quant(x)))))
        return self.dequant(self.fc(h.mean((2, 3))))


def get_model():
    torch.manual_seed(0)
    model = Net().train()
    model.qconfig = tq.get_default_qat_qconfig("fbgemm")
    return tq.prepare_qat(model)


def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(16, 3, 32, 32), torch.randint(0, 10, (16,)))


def get_loss(out, x, y):
    return F.cross_entropy(out, y)
