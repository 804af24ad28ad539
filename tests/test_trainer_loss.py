"""The loss of ``mlora-export train``'s Trainer, computed from the supervised positions' logits only,
equals the model's own causal-LM loss (value and gradients), with and without ``num_items_in_batch``."""

from __future__ import annotations

import pytest
import torch

from mlora_export.adapter import MatryoshkaConfig
from mlora_export.training import add_nested_adapter
from mlora_export.training.trainer import supervised_loss
from tests.common import build_model, randomise_lora_b

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _batch() -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 96, (3, 9), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :3] = -100  # a prompt
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


@pytest.mark.parametrize("num_items", [None, 11])
def test_supervised_loss_equals_the_models_own_loss_and_gradients(num_items: int | None) -> None:
    nested = add_nested_adapter(build_model("llama").train(), MatryoshkaConfig("nested-loss", 8, (1, 2, 4, 8)), seed=1)
    randomise_lora_b(nested)
    batch = _batch()
    kwargs = {} if num_items is None else {"num_items_in_batch": torch.tensor(num_items)}
    nested.train_diagonal(0)
    want = nested.model(**batch, **kwargs).loss
    want.backward()
    grads = {n: p.grad.clone() for n, p in nested.model.named_parameters() if p.requires_grad}
    nested.model.zero_grad(set_to_none=True)
    nested.train_diagonal(0)
    got = supervised_loss(nested.model, batch, kwargs.get("num_items_in_batch"))
    got.backward()
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    for n, p in nested.model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-7, msg=n)


def test_a_model_without_an_output_head_is_left_to_the_trainer() -> None:
    model = build_model("bert")  # a classifier: no LM head to feed
    assert supervised_loss(model, {"input_ids": torch.ones(1, 4, dtype=torch.long), "labels": torch.zeros(1, dtype=torch.long)}) is None
