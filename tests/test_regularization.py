"""Regularizer gradients equal autograd of λR; noise only on live entries, reproducible from the seed."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightning_demp.noise import inject_noise_, live_masks
from lightning_demp.regularization import add_penalty_grad_, norm_scales, penalized_params

PENALTIES = {
    "l2": lambda p: 0.5 * p.pow(2).sum(),
    "positive_l2": lambda p: 0.5 * p.clamp(min=0).pow(2).sum(),
    "l1_norm_scale": lambda p: p.abs().sum(),
    "positive_group_l1": lambda p: p.clamp(min=0).reshape(p.shape[0], -1).norm(dim=1).sum(),
}


@pytest.mark.parametrize("regularizer", list(PENALTIES))
def test_penalty_gradient_equals_autograd_of_the_penalty(regularizer):
    strength = 0.37
    param = nn.Parameter(torch.randn(5, 4))
    param.grad = torch.randn(5, 4)
    loss_grad = param.grad.clone()
    add_penalty_grad_([param], regularizer, strength)
    reference = param.detach().clone().requires_grad_(True)
    (strength * PENALTIES[regularizer](reference)).backward()
    torch.testing.assert_close(param.grad, loss_grad + reference.grad)


def test_l1_norm_scale_targets_only_norm_scales():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 4), nn.LayerNorm(4))
    optimizer = torch.optim.AdamW(model.parameters())
    targets = penalized_params(optimizer, model, "l1_norm_scale")
    assert [id(p) for p in targets] == [id(model[1].weight), id(model[3].weight)]
    assert len(norm_scales(model)) == 2


def test_l2_respects_groups_the_user_set_to_zero_weight_decay():
    model = nn.Linear(3, 4)
    optimizer = torch.optim.AdamW(
        [{"params": [model.weight], "weight_decay": 0.01}, {"params": [model.bias], "weight_decay": 0.0}]
    )
    assert [id(p) for p in penalized_params(optimizer, model, "l2")] == [id(model.weight)]
    plain = torch.optim.Adam(model.parameters())  # no decay anywhere: nothing was excluded on purpose
    assert len(penalized_params(plain, model, "positive_l2")) == 2


def test_frozen_parameters_are_not_regularized():
    model = nn.Linear(3, 4)
    model.bias.requires_grad_(False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    assert [id(p) for p in penalized_params(optimizer, model, "l2")] == [id(model.weight)]


def test_noise_touches_only_entries_with_a_nonzero_gradient_and_is_reproducible():
    param = nn.Parameter(torch.zeros(6, 3))
    param.grad = torch.zeros(6, 3)
    param.grad[[0, 2, 5]] = 1.0  # rows 1, 3, 4 belong to dead units
    masks = live_masks([param])
    inject_noise_(masks, std=0.1, seed=3, step=11)
    first = param.detach().clone()
    assert torch.count_nonzero(first[[1, 3, 4]]) == 0
    assert torch.count_nonzero(first[[0, 2, 5]]) == 9
    assert 0.01 < first[[0, 2, 5]].std().item() < 0.5
    param.data.zero_()
    inject_noise_(masks, std=0.1, seed=3, step=11)
    assert torch.equal(param.detach(), first)
    param.data.zero_()
    inject_noise_(masks, std=0.1, seed=3, step=12)
    assert not torch.equal(param.detach(), first)


def test_noise_is_not_scaled_by_anything_but_its_std():
    param = nn.Parameter(torch.zeros(10000))
    param.grad = torch.ones(10000)
    inject_noise_(live_masks([param]), std=2.0, seed=0, step=0)
    assert param.detach().std().item() == pytest.approx(2.0, rel=0.05)


def test_penalize_prunable_leaves_the_output_layer_unregularized(tmp_path):
    from lightning.pytorch import Callback

    from helpers.lightning import small_mlp, train_with_callback

    class FirstGrads(Callback):  # runs after DemonPruning's hook: sees the loss gradient plus the penalty
        grads: dict[str, torch.Tensor] | None = None

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if self.grads is None:
                self.grads = {n: p.grad.clone() for n, p in pl_module.named_parameters() if p.grad is not None}

    def first_grads(reg_max, penalize):
        torch.manual_seed(0)
        recorder = FirstGrads()
        train_with_callback(
            tmp_path,
            model=small_mlp(),
            trainer_kwargs={"callbacks": [recorder], "max_steps": 1, "limit_val_batches": 0},
            regularizer="l2",
            reg_max=reg_max,
            noise_std=0.0,
            schedule="constant",
            penalize=penalize,
            plot=False,
        )
        return recorder.grads

    plain, everything, prunable = first_grads(0.0, "all"), first_grads(1.0, "all"), first_grads(1.0, "prunable")
    penalty_all = {name: (everything[name] - plain[name]).abs().sum().item() for name in plain}
    penalty_prunable = {name: (prunable[name] - plain[name]).abs().sum().item() for name in plain}
    assert all(value > 0 for value in penalty_all.values())  # "all": every parameter, the output layer too
    assert penalty_prunable["net.4.weight"] == 0 and penalty_prunable["net.4.bias"] == 0  # the output layer is free
    assert all(penalty_prunable[f"net.{i}.{kind}"] > 0 for i in (0, 2) for kind in ("weight", "bias"))


def test_penalize_is_validated():
    from lightning_demp import DemonPruning

    with pytest.raises(ValueError, match=r"Expected `penalize` to be one of \('all', 'prunable'\), got 'some'"):
        DemonPruning(penalize="some")


def test_the_group_pull_on_a_unit_is_the_same_whatever_the_size_of_its_weights():
    weight = nn.Parameter(torch.tensor([[3.0, 4.0, -1.0], [0.03, 0.04, -2.0], [-1.0, -1.0, -1.0]]))
    weight.grad = torch.zeros_like(weight)
    add_penalty_grad_([weight], "positive_group_l1", strength=1.0)
    assert torch.allclose(weight.grad[0], weight.grad[1])  # a large unit and a small one: the same pull
    assert torch.allclose(weight.grad[:2].norm(dim=1), torch.ones(2))
    assert not weight.grad[:, 2].any() and not weight.grad[2].any()  # negative weights are never pulled


def test_positive_group_l1_kills_units_of_a_norm_free_mlp(tmp_path):
    from helpers.lightning import small_mlp, train_with_callback

    _, model, callback = train_with_callback(
        tmp_path, small_mlp(), max_epochs=4, regularizer="positive_group_l1", reg_max=0.5, schedule="constant"
    )
    assert callback.events and model.net[0].out_features + model.net[2].out_features < 12 + 10


def test_noise_on_parameters_of_two_dtypes_keeps_each_dtype_and_its_std():
    single, double = nn.Parameter(torch.zeros(20000)), nn.Parameter(torch.zeros(20000, dtype=torch.float64))
    single.grad, double.grad = torch.ones(20000), torch.ones(20000, dtype=torch.float64)
    inject_noise_(live_masks([single, double]), std=0.5, seed=1, step=2)
    assert (single.dtype, double.dtype) == (torch.float32, torch.float64)
    assert single.detach().std().item() == pytest.approx(0.5, rel=0.05)
    assert double.detach().std().item() == pytest.approx(0.5, rel=0.05)


def test_a_boolean_mask_and_its_factor_mask_give_the_same_noise_and_scales_multiply_it():
    first, second = nn.Parameter(torch.zeros(4, 3)), nn.Parameter(torch.zeros(4, 3))
    boolean = torch.tensor([True, False, True, True]).reshape(4, 1).expand(4, 3)
    inject_noise_([(first, boolean)], std=0.1, seed=0, step=3)
    inject_noise_([(second, boolean.float())], std=0.05, seed=0, step=3, scales=[2.0])
    assert torch.equal(first.detach(), second.detach())
    assert torch.count_nonzero(first[1]) == 0 and torch.count_nonzero(first) == 9


def test_live_masks_are_one_on_every_nonzero_gradient_entry_and_zero_elsewhere():
    param = nn.Parameter(torch.ones(5))
    param.grad = torch.tensor([0.0, -3.0, 1e-30, -0.0, 2.0])
    [(_, mask)] = live_masks([param])
    assert mask.tolist() == [0.0, 1.0, 1.0, 0.0, 1.0]
