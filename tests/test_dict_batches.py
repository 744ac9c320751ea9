"""Batches that are mappings (dicts, Hugging Face's ``BatchEncoding``, a ``UserDict``) reach ``forward`` as keyword
arguments, with no subclass of `DemonPruning`; ``input_keys`` names them for CLI users."""

from __future__ import annotations

from collections import UserDict

import lightning.pytorch as pl
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from helpers.lightning import quiet_trainer
from helpers.models import kill_linear_units_
from lightning_demp import DemonPruning


class Encoding(UserDict):
    """Like ``transformers.BatchEncoding``: a ``UserDict``, not a ``dict``."""


class TokenDataset(Dataset):
    def __init__(self, size: int = 96, mapping: type = dict) -> None:
        generator = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, 20, (size, 6), generator=generator)
        self.mask = torch.ones(size, 6)
        self.labels = (self.ids.sum(dim=1) % 3).long()
        self.mapping = mapping

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int):
        return {"input_ids": self.ids[index], "attention_mask": self.mask[index], "labels": self.labels[index]}


def collate(mapping: type):
    def collate_fn(items):
        return mapping({key: torch.stack([item[key] for item in items]) for key in items[0]})

    return collate_fn


class BagOfTokens(pl.LightningModule):
    """``forward(input_ids, attention_mask)`` like a Hugging Face encoder; the batch also carries ``labels``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.hidden = nn.Linear(8, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pooled = (self.embed(input_ids) * attention_mask[..., None]).mean(dim=1)
        return self.head(torch.relu(self.hidden(pooled)))

    def training_step(self, batch, batch_idx):
        logits = self(batch["input_ids"], batch["attention_mask"])
        return nn.functional.cross_entropy(logits, batch["labels"])

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=0.0)


@pytest.mark.parametrize("mapping", [dict, Encoding])
@pytest.mark.parametrize("input_keys", [None, ["input_ids", "attention_mask"]])
def test_mapping_batches_reach_forward_as_keywords_and_dead_units_go(tmp_path, mapping, input_keys):
    model = BagOfTokens()
    with torch.no_grad():
        model.hidden.bias.fill_(1.0)
    kill_linear_units_(model.hidden, [2, 7, 11])
    batch = collate(mapping)([TokenDataset()[index] for index in range(8)])
    with torch.no_grad():
        expected = model(batch["input_ids"], batch["attention_mask"])
    callback = DemonPruning(regularizer="positive_l2", reg_max=0.0, noise_std=0.0, verbose=False, input_keys=input_keys)
    loader = DataLoader(TokenDataset(), batch_size=16, collate_fn=collate(mapping))
    quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(model, loader)
    assert model.hidden.out_features == 13 and callback.kept_units["hidden"] == [
        unit for unit in range(16) if unit not in (2, 7, 11)
    ]
    with torch.no_grad():
        torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), expected)


def test_input_keys_missing_from_the_batch_are_named(tmp_path):
    callback = DemonPruning(regularizer="positive_l2", verbose=False, input_keys=["input_ids", "token_type_ids"])
    loader = DataLoader(TokenDataset(), batch_size=16, collate_fn=collate(dict))
    with pytest.raises(KeyError, match=r"the batch has no \['token_type_ids'\]; its keys are"):
        quiet_trainer(tmp_path, max_epochs=1, callbacks=[callback]).fit(BagOfTokens(), loader)


def test_input_keys_are_validated():
    with pytest.raises(TypeError, match="Expected `input_keys` to be a non-empty list of str"):
        DemonPruning(input_keys="input_ids")
