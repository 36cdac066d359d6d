"""Hugging Face Trainer: a placed model (hf_device_map set) trains with the loss curve of the plain model."""

from __future__ import annotations

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

from placer.integrations.huggingface import StepTimeCallback, place_for_trainer  # noqa: E402


class TinyClassifier(torch.nn.Module):
    """An HF-style model: keyword inputs, returns a dict with the loss when labels are given."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = [torch.nn.Linear(16, 64), torch.nn.ReLU()]
        for _ in range(4):  # enough groups for the search over 5 devices
            layers += [torch.nn.Linear(64, 64), torch.nn.ReLU()]
        self.encoder = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(64, 4)

    def forward(self, x, labels=None):
        logits = self.head(self.encoder(x))
        if labels is None:
            return {"logits": logits}
        return {"loss": torch.nn.functional.cross_entropy(logits, labels), "logits": logits}


def _dataset():
    g = torch.Generator().manual_seed(5)
    return [{"x": torch.randn(16, generator=g), "labels": torch.randint(0, 4, (), generator=g)} for _ in range(48)]


def _train(model, tmp_path, callbacks=()):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=8, logging_steps=1,
        report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-2, seed=0, data_seed=0,
        dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = transformers.Trainer(model=model, args=args, train_dataset=_dataset(), callbacks=list(callbacks))
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h], trainer


def test_placed_model_trains_like_plain_model(tmp_path):
    model = TinyClassifier()
    expected, _ = _train(copy.deepcopy(model), tmp_path / "plain")
    placed = place_for_trainer(model, (torch.randn(8, 16),), cluster="4xK40", budget="200",
                               cache_dir=tmp_path / "cache")
    assert placed is model and isinstance(placed.hf_device_map, dict) and placed.hf_device_map
    timer = StepTimeCallback()
    got, trainer = _train(placed, tmp_path / "placed", [timer])
    assert len(got) == 6 and got == pytest.approx(expected, rel=1e-5)
    assert len(timer.times) == 6 and all(t > 0 for t in timer.times)
    assert any("step_time_ms" in h for h in trainer.state.log_history)
