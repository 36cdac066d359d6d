"""PlacerCallback: a Lightning fit with placement (searched or tuned) gives the loss curve of a plain fit."""

from __future__ import annotations

import copy
import logging

import pytest
import torch

L = pytest.importorskip("lightning")

from graphs.errors import PlacerError  # noqa: E402
from placer.integrations.lightning import PlacerCallback  # noqa: E402


def _net() -> torch.nn.Module:
    torch.manual_seed(0)
    layers: list[torch.nn.Module] = [torch.nn.Linear(16, 96), torch.nn.ReLU()]
    for _ in range(4):
        layers += [torch.nn.Linear(96, 96), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers, torch.nn.Linear(96, 4))


class Module(L.LightningModule):
    def __init__(self, net: torch.nn.Module, opt: str = "adam") -> None:
        super().__init__()
        self.model = net
        self.opt = opt
        self.losses: list[float] = []

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x), y)
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self):
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=1e-2)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def _loader():
    g = torch.Generator().manual_seed(2)
    data = torch.utils.data.TensorDataset(torch.randn(64, 16, generator=g), torch.randint(0, 4, (64,), generator=g))
    return torch.utils.data.DataLoader(data, batch_size=8, shuffle=False)


def _fit(module: L.LightningModule, callbacks=()) -> list[float]:
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    trainer = L.Trainer(max_steps=8, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, _loader())
    return module.losses


def _candidates(net: torch.nn.Module) -> list[dict[str, str]]:
    from graphs.capture import capture

    nodes = list(capture(net, (torch.randn(8, 16),)).graph.nodes)
    return [{n: "gpu0" for n in nodes}, {n: f"gpu{i % 4}" for i, n in enumerate(nodes)},
            {n: ("gpu1" if i < len(nodes) // 2 else "gpu2") for i, n in enumerate(nodes)}]


@pytest.mark.parametrize("opt", ["adam", pytest.param("sgd", marks=pytest.mark.slow)])
def test_tuned_fit_matches_plain_fit(opt):
    net = _net()
    plain = Module(copy.deepcopy(net), opt)
    expected = _fit(plain)
    callback = PlacerCallback((torch.randn(8, 16),), cluster="4xK40", tune=True, trials=6,
                              candidates=_candidates(net))
    tuned = Module(net, opt)
    got = _fit(tuned, [callback])
    assert callback.tuner.switches >= 2 and callback.tuner.settled
    assert isinstance(tuned.model, torch.fx.GraphModule)
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    theirs = dict(plain.named_parameters())
    for name, p in tuned.named_parameters():  # same qualified names, same values
        torch.testing.assert_close(p, theirs[name], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a real search (seconds of profiling + baselines); test_integrations_loop covers it too
def test_searched_placement_fit_matches_plain_fit(tmp_path):
    net = _net()
    expected = _fit(Module(copy.deepcopy(net)))
    callback = PlacerCallback((torch.randn(8, 16),), cluster="4xK40", budget="200", cache_dir=tmp_path)
    module = Module(net)
    got = _fit(module, [callback])
    assert callback.info is not None and not callback.info.cache_hit
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_missing_attribute_is_a_clear_error():
    class Bare(Module):
        pass

    module = Bare(_net())
    callback = PlacerCallback((torch.randn(8, 16),), attr="net", cluster="4xK40")
    with pytest.raises(PlacerError, match="no submodule 'net'"):
        _fit(module, [callback])


@pytest.mark.parametrize("options, named", [
    ({"cluster": "nosuch"}, "nosuch"),
    ({"cluster": "4xK40", "budget": "soon"}, "budget"),
])
def test_a_bad_cluster_or_budget_is_refused_when_the_callback_is_made_not_at_fit(options, named):
    with pytest.raises(PlacerError, match=named):
        PlacerCallback((torch.randn(8, 16),), **options)


class _KeywordNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = _net()

    def forward(self, x, scale=None):
        return self.net(x) * scale


class _KeywordModule(Module):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self.model(x=x, scale=torch.ones(4)), y)
        self.losses.append(float(loss.detach()))
        return loss


def test_a_network_given_its_example_batch_as_a_dict_trains_placed_like_the_plain_one(tmp_path):
    plain = _fit(_KeywordModule(_KeywordNet()))
    batch = {"x": torch.randn(8, 16), "scale": torch.ones(4)}
    placed = _fit(_KeywordModule(_KeywordNet()),
                  [PlacerCallback(batch, cluster="4xK40", budget="300", cache_dir=tmp_path)])
    assert placed == pytest.approx(plain, rel=1e-5, abs=1e-6)
