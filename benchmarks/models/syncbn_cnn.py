"""A small CNN whose BatchNorms are SyncBatchNorm, as a DDP training script converts them
(benchmarks/results/model_styles.md, "Fourth round"). Where no other process holds a replica of
a layer (the ranks of a placement, a pipeline without replicas) it is the plain BatchNorm the
placed model runs (envs.runtime.replica_batch_norm.unsynced_batch_norms); before, every measured
placement and pipeline failed: "SyncBatchNorm expected input tensor to be on GPU".
"""
import torch
import torch.nn.functional as F
from torch import nn


def get_model():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                      nn.Conv2d(32, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
                      nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))
    return nn.SyncBatchNorm.convert_sync_batchnorm(m)

def get_example_inputs():
    torch.manual_seed(1)
    return (torch.randn(32, 3, 32, 32), torch.randint(0, 10, (32,)))

def get_loss(out, x, y):
    return F.cross_entropy(out, y)
