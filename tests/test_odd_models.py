"""Odd models either keep working (outputs preserved) or are refused with a reason."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_surgery import remove_dead_
from torch import nn

from helpers.models import (
    assert_optimizer_follows,
    kill_bn_units_,
    kill_linear_units_,
    make_alive_,
    randomize_bn_,
    tagged_adam,
)
from lightning_demp.config import PruningConfig
from lightning_demp.core import DemonPruner
from lightning_demp.graph import PrunableGraph
from lightning_demp.resize import layer_widths


class TiedWeights(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.encoder = nn.Linear(8, 8)
        self.decoder = nn.Linear(8, 8)
        self.decoder.weight = self.encoder.weight
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.decoder(F.relu(self.encoder(x)))))


def test_groups_touching_tied_weights_are_blocked_with_a_reason():
    groups = {g.name: g for g in PrunableGraph(TiedWeights(), torch.randn(2, 8)).groups()}
    assert "shares parameters" in groups["encoder"].blocked
    assert "shares parameters" in groups["decoder"].blocked


class ReusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(5, 8)
        self.shared = nn.Linear(8, 8)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.shared(F.relu(self.fc1(x))))
        return self.head(F.relu(self.shared(h)))


def test_a_module_called_twice_is_pruned_only_where_dead_in_both_calls():
    model = make_alive_(ReusedLayer())
    with torch.no_grad():
        model.shared.weight.abs_()
    kill_linear_units_(model.fc1, [2])  # read by `shared` in the first call only: alive in the second call
    x = torch.randn(64, 5)
    model.eval()
    before = model(x)
    remove_dead_(model, x)
    torch.testing.assert_close(model(x), before)


def test_a_unit_dead_in_every_call_of_a_reused_module_is_removed():
    model = make_alive_(ReusedLayer())
    kill_linear_units_(model.fc1, [2])
    kill_linear_units_(model.shared, [2])  # unit 2 is 0 at both inputs of `shared`
    x = torch.randn(64, 5)
    model.eval()
    before = model(x)
    removed = remove_dead_(model, x)
    torch.testing.assert_close(model(x), before)
    assert sum(removed.values()) >= 1
    assert model.shared.in_features == model.shared.out_features == 7


class DepthwiseNet(nn.Module):
    def __init__(self, groups: int) -> None:
        super().__init__()
        self.conv = nn.Conv1d(2, 8, 3, padding=1)
        self.bn = nn.BatchNorm1d(8)
        self.dw = nn.Conv1d(8, 8, 3, padding=1, groups=groups)
        self.dw_bn = nn.BatchNorm1d(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn(self.conv(x)))
        x = F.relu(self.dw_bn(self.dw(x)))
        return self.head(x.mean(-1))


def test_depthwise_convolutions_are_pruned_with_their_input_channels():
    model = DepthwiseNet(groups=8)
    randomize_bn_(model)
    kill_bn_units_(model.bn, [1])
    kill_bn_units_(model.dw_bn, [1])  # the channel is dead before and after the depthwise conv
    x = torch.randn(32, 2, 10)
    model.eval()
    before = model(x)
    remove_dead_(model, x)
    torch.testing.assert_close(model(x), before)
    assert layer_widths(model)["dw"] == 7


def test_grouped_convolutions_are_refused_with_a_reason():
    groups = {g.name: g for g in PrunableGraph(DepthwiseNet(groups=2), torch.randn(2, 2, 10)).groups()}
    assert any("grouped convolution" in (g.blocked or "") for g in groups.values())


def test_parameters_frozen_by_the_user_are_removed_like_others_and_stay_frozen():
    model = make_alive_(ReusedLayer())
    model.fc1.requires_grad_(False)
    kill_linear_units_(model.fc1, [0])
    kill_linear_units_(model.shared, [0])
    remove_dead_(model, torch.randn(32, 5))
    assert not model.fc1.weight.requires_grad
    assert model.fc1.out_features == 7


class TransposedDecoder(nn.Module):
    """An autoencoder whose decoder is the encoder's weight, transposed: ``F.linear(h, enc.weight.t())``."""

    def __init__(self) -> None:
        super().__init__()
        self.enc = nn.Linear(6, 8)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.linear(F.relu(self.enc(x)), self.enc.weight.t()))


def test_a_transposed_tied_weight_blocks_its_group_and_training_goes_on(tmp_path):
    from helpers.lightning import RandomDataModule, quiet_trainer
    from lightning_demp import DemonPruning
    from lightning_demp.demos import DemoClassifier

    class Classifier(DemoClassifier):
        def __init__(self) -> None:
            super().__init__(num_classes=3)
            self.net = make_alive_(TransposedDecoder())
            kill_linear_units_(self.net.enc, [2, 5])  # dead, but their rows are also the decoder's columns

    groups = {g.name: g for g in PrunableGraph(TransposedDecoder(), torch.randn(2, 6)).groups()}
    assert "also used outside it (a tied or transposed weight)" in groups["enc"].blocked
    model = Classifier()
    callback = DemonPruning(regularizer="l2", verbose=False)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, datamodule=RandomDataModule())
    assert model.net.enc.out_features == 8 and callback.events == []


class UnitSizedTensors(nn.Module):
    """A per-unit gain (an unwrapped parameter) and, optionally, a per-unit buffer on the hidden units."""

    def __init__(self, with_buffer: bool) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 12)
        self.gain = nn.Parameter(torch.ones(12))
        self.fc2 = nn.Linear(12, 3)
        self.with_buffer = with_buffer
        self.register_buffer("scale", torch.full((12,), 2.0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden = F.relu(self.fc1(x)) * self.gain
        return self.fc2(hidden * self.scale if self.with_buffer else hidden)


def _unit_sized_classifier(with_buffer: bool):
    from lightning_demp.demos import DemoClassifier

    class Classifier(DemoClassifier):
        def __init__(self) -> None:
            super().__init__(num_classes=3, optimizer="adam", lr_schedule="constant", weight_decay=0.0)
            self.net = make_alive_(UnitSizedTensors(with_buffer))
            kill_linear_units_(self.net.fc1, [2, 5])

    return Classifier()


def test_a_unit_sized_parameter_is_sliced_and_keeps_training_in_its_optimizer_group(tmp_path):
    from helpers.lightning import RandomDataModule, quiet_trainer
    from lightning_demp import DemonPruning

    model = _unit_sized_classifier(with_buffer=False)
    callback = DemonPruning(regularizer="l2", verbose=False, noise_std=0.0)
    trainer = quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback])
    trainer.fit(model, datamodule=RandomDataModule())
    assert model.net.fc1.out_features == 10 and model.net.gain.shape == (10,)
    optimizer = trainer.optimizers[0]
    assert any(p is model.net.gain for group in optimizer.param_groups for p in group["params"])
    assert optimizer.state[model.net.gain]["exp_avg"].shape == (10,)
    assert not torch.equal(model.net.gain.detach(), torch.ones(10))  # it trained after the removal too


def test_a_unit_sized_buffer_blocks_its_group_with_a_reason(tmp_path):
    from helpers.lightning import RandomDataModule, quiet_trainer
    from lightning_demp import DemonPruning

    groups = {g.name: g for g in PrunableGraph(UnitSizedTensors(with_buffer=True), torch.randn(2, 6)).groups()}
    assert "the buffer `scale` is applied to its units" in groups["fc1"].blocked
    model = _unit_sized_classifier(with_buffer=True)
    quiet_trainer(tmp_path, max_epochs=2, callbacks=[DemonPruning(regularizer="l2", verbose=False)]).fit(
        model, datamodule=RandomDataModule()
    )
    assert model.net.fc1.out_features == 12  # nothing removed, training went on


def test_a_training_only_head_the_trace_did_not_see_blocks_the_groups_it_reads(tmp_path):
    import pytest

    from helpers.lightning import RandomDataModule, quiet_trainer
    from lightning_demp import DemonPruning
    from lightning_demp.demos import DemoClassifier

    class AuxiliaryHead(DemoClassifier):
        def __init__(self) -> None:
            super().__init__(num_classes=3, optimizer="adam", lr_schedule="constant", weight_decay=0.0)
            self.body = nn.Linear(6, 12)
            self.head = nn.Linear(12, 3)
            self.aux = nn.Linear(12, 3)  # only in training: the eval-mode trace never runs it
            self.example_input_array = torch.zeros(2, 6)
            make_alive_(self)
            kill_linear_units_(self.body, [1, 8])

        def forward(self, x):
            hidden = F.relu(self.body(x))
            return (self.head(hidden), self.aux(hidden)) if self.training else self.head(hidden)

        def training_step(self, batch, batch_idx):
            x, y = batch
            logits, aux = self(x)
            return F.cross_entropy(logits, y) + 0.3 * F.cross_entropy(aux, y)

    model = AuxiliaryHead()
    callback = DemonPruning(regularizer="l2", verbose=False)
    with pytest.warns(UserWarning, match=r"`aux` ran in training but not in the trace; its groups \['body'\]"):
        quiet_trainer(tmp_path, max_epochs=2, callbacks=[callback]).fit(model, datamodule=RandomDataModule())
    assert model.body.out_features == model.aux.in_features == 12 and callback.events == []


class GlobalResponseNorm(nn.Module):
    """ConvNeXtV2's GRN: each channel's response over positions, divided by the mean response over channels."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.randn(1, channels, 1))
        self.beta = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        response = x.norm(p=2, dim=2, keepdim=True)
        return self.gamma * (x * response / (response.mean(dim=1, keepdim=True) + 1e-6)) + self.beta + x


class ConvGRNConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.expand = nn.Conv1d(3, 8, 3, padding=1)
        self.grn = GlobalResponseNorm(8)
        self.project = nn.Conv1d(8, 6, 1)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.project(self.grn(torch.relu(self.expand(x)))).mean(dim=2))


def test_a_layer_that_averages_over_channels_keeps_its_units_whole():
    torch.manual_seed(0)
    model = ConvGRNConv().eval()
    with torch.no_grad():  # channels 1 and 4 are 0 after the ReLU, and GRN keeps them 0: dead at `project`
        model.expand.weight[[1, 4]] = 0.0
        model.expand.bias[[1, 4]] = -1.0
    x = torch.randn(6, 3, 10)
    with torch.no_grad():
        before = model(x)
    groups = {group.name: group for group in PrunableGraph(model, x[:2]).groups()}
    assert groups["expand"].blocked is not None and "`mean` over dimension 1" in groups["expand"].blocked
    assert remove_dead_(model, x) == {}  # before: both went, and the channel mean changed every other channel
    assert model.expand.out_channels == 8 and model.grn.gamma.shape == (1, 8, 1)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    torch.export.export(model, (x,))


class MeanOverPositions(nn.Module):
    """Two convolutions, then a mean over each spatial dimension in turn, then a head."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Conv2d(3, 8, 3, padding=1)
        self.second = nn.Conv2d(8, 8, 1)
        self.head = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = torch.relu(self.second(torch.relu(self.first(x))))
        return self.head(features.mean(dim=3).mean(dim=2))


def test_a_mean_over_positions_is_no_reduction_over_units_even_with_as_many_positions_as_units():
    model = MeanOverPositions().eval()
    x = torch.randn(4, 3, 8, 8)  # 8 channels, 8×8 positions: the mean over dimension 3 is not over the units
    groups = {group.name: group for group in PrunableGraph(model, x[:2]).groups()}
    assert groups["first"].blocked is None and groups["second"].blocked is None


class UpsamplingDecoder(nn.Module):
    """A strided convolution, a transposed convolution that upsamples its channels back, a 1×1 head."""

    def __init__(self, transposed: type[nn.Module] = nn.ConvTranspose2d) -> None:
        super().__init__()
        conv = nn.Conv2d if transposed is nn.ConvTranspose2d else nn.Conv1d
        self.down = conv(3, 8, 3, stride=2, padding=1)
        self.up = transposed(8, 6, 2, stride=2)
        self.head = conv(6, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(torch.relu(self.down(x)))))


@pytest.mark.parametrize(
    ("transposed", "shape"), [(nn.ConvTranspose2d, (4, 3, 8, 8)), (nn.ConvTranspose1d, (4, 3, 10))]
)
def test_a_transposed_convolution_loses_the_dead_units_it_reads_and_writes(transposed, shape):
    torch.manual_seed(0)
    model = UpsamplingDecoder(transposed).eval()
    kill_linear_units_(model.down, [2, 5])  # zero filters and a negative bias: 0 after the ReLU
    with torch.no_grad():  # an output channel of `up` that is dead too: its weight is (in, out, ...)
        model.up.weight[:, 4] = 0.0
        model.up.bias[4] = -1.0
    x = torch.randn(*shape)
    with torch.no_grad():
        before = model(x)
        down = torch.relu(model.down(x))
        up = torch.relu(model.up(down))
    dead = {
        name: int(out.transpose(0, 1).flatten(1).amax(dim=1).eq(0).sum()) for name, out in [("down", down), ("up", up)]
    }
    assert dead["down"] >= 2 and dead["up"] >= 1  # the planted ones, and any the initialization left dead
    groups = {group.name: group for group in PrunableGraph(model, x[:2]).groups()}
    assert [reader.reader for reader in groups["down"].readers] == ["up"]  # before: "no Linear/Conv layer reads"
    assert groups["up"].blocked is None and [reader.reader for reader in groups["up"].readers] == ["head"]
    optimizer = tagged_adam(model)
    pruner = DemonPruner(PruningConfig(regularizer="positive_l2", reg_max=0.0, noise_std=0.0))
    pruner.prepare(model, x[:2], total_steps=1)
    pruner.remember_batch((x, None))
    event = pruner.removal_event(model, [optimizer], step=1, epoch=0, final=True)
    assert event is not None and event.removed == dead
    widths = (model.down.out_channels, model.up.in_channels, model.up.out_channels, model.head.in_channels)
    assert widths == (8 - dead["down"], 8 - dead["down"], 6 - dead["up"], 6 - dead["up"])
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)
    assert_optimizer_follows(model, optimizer)
    torch.export.export(model, (x,))


def test_the_pull_on_a_transposed_convolution_runs_along_its_output_channels():
    from lightning_demp.regularization import penalty_grads, resistance

    weight = nn.Parameter(torch.randn(4, 3, 2, 2))  # (in, out, kH, kW): 3 units
    weight.grad = torch.randn(4, 3, 2, 2)
    as_rows = nn.Parameter(weight.detach().transpose(0, 1).contiguous())  # the same units, on dim 0
    as_rows.grad = weight.grad.transpose(0, 1).contiguous()
    for regularizer in ("l2", "positive_l2", "positive_group_l1"):
        torch.testing.assert_close(resistance(weight, regularizer, unit_dim=1), resistance(as_rows, regularizer))
    pull = penalty_grads([weight], "positive_group_l1", [1])[0]
    torch.testing.assert_close(pull.transpose(0, 1), penalty_grads([as_rows], "positive_group_l1")[0])


def test_a_focused_target_pulls_only_the_chosen_output_channels_of_a_transposed_convolution():
    from lightning_demp.pressure import Pressure
    from lightning_demp.regularization import group_parameters

    model = UpsamplingDecoder().eval()
    x = torch.randn(4, 3, 8, 8)
    groups = group_parameters(PrunableGraph(model, x[:2]))
    pressure = Pressure(PruningConfig(regularizer="positive_l2", reg_max=1.0, noise_std=0.0, live_floor=0.0))
    pressure.lay_out(10)
    pressure.bind({name: (parameters, 6) for name, parameters in groups.items()}, None)
    pressure.focus_on({"up": [1, 4]})
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with torch.no_grad():
        model.up.weight.abs_()  # positive: the one-sided pull reaches every entry
    model(x).sum().backward()
    before = model.up.weight.grad.clone()
    pressure.before_step_(optimizer, model, step=0)
    changed = (model.up.weight.grad - before).abs().sum(dim=(0, 2, 3))  # per output channel of `up`
    assert changed[[1, 4]].gt(0).all() and changed[[0, 2, 3, 5]].eq(0).all()


class ReducedOverUnits(nn.Module):
    """``first`` writes units, ``normalize`` mixes (or not) them, ``second`` reads them, ``head`` pools positions."""

    def __init__(self, normalize, conv: bool) -> None:
        super().__init__()
        self.first = nn.Conv1d(3, 8, 1) if conv else nn.Linear(3, 8)
        self.second = nn.Conv1d(8, 4, 1) if conv else nn.Linear(8, 4)
        self.head = nn.Linear(4, 2)
        self.normalize, self.conv = normalize, conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.normalize(torch.relu(self.first(x)))
        return self.head(self.second(h).mean(dim=2 if self.conv else 1))


def mean_over_channels_moved_last(h: torch.Tensor) -> torch.Tensor:
    last = h.transpose(1, 2)  # (batch, positions, channels), as ConvNeXt blocks lay it out
    return (last / (last.mean(2, keepdim=True) + 1)).transpose(1, 2)


MIXING = {  # (normalize, conv): the input is (batch, 3, 5) for a convolution, (batch, 5, 3) for a Linear
    "mean over the last dimension after a Linear (dim=-1)": (lambda h: h / (h.mean(-1, keepdim=True) + 1), False),
    "softmax over the units after a Linear": (lambda h: h.softmax(-1), False),
    "var over the channels": (lambda h: h / (h.var(1, keepdim=True) + 1), True),
    "std over the channels": (lambda h: h / (h.std(1, keepdim=True) + 1), True),
    "a mean over everything": (lambda h: h / (h.mean() + 1), True),
    "a mean over channels moved last": (mean_over_channels_moved_last, True),
    "layer_norm without weights over the units": (lambda h: nn.functional.layer_norm(h, (8,)), False),
}


@pytest.mark.parametrize("pattern", sorted(MIXING))
def test_every_reduction_over_the_units_keeps_them_whole(pattern):
    torch.manual_seed(0)
    normalize, conv = MIXING[pattern]
    model = ReducedOverUnits(normalize, conv).eval()
    kill_linear_units_(model.first, [2, 5])  # 0 after the ReLU, but the reduction reads them
    x = torch.randn(6, 3, 5) if conv else torch.randn(6, 5, 3)
    with torch.no_grad():
        before = model(x)
    groups = {group.name: group for group in PrunableGraph(model, x[:2]).groups()}
    assert "reduced together" in (groups["first"].blocked or "")
    assert remove_dead_(model, x) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize(
    ("normalize", "conv"),
    [(lambda h: h / (h.mean(-2, keepdim=True) + 1), False), (lambda h: h / (h.mean(2, keepdim=True) + 1), True)],
    ids=["a mean over tokens after a Linear", "a mean over positions after a convolution"],
)
def test_a_reduction_over_positions_leaves_the_units_free(normalize, conv):
    model = ReducedOverUnits(normalize, conv).eval()
    x = torch.randn(6, 3, 8) if conv else torch.randn(6, 8, 3)  # as many positions as units
    groups = {group.name: group for group in PrunableGraph(model, x[:2]).groups()}
    assert groups["first"].blocked is None


def test_a_transposed_convolution_weighs_the_units_it_reads_by_its_input_filters():
    from lightning_demp.target import unit_importance
    from lightning_demp.units import ReaderStats

    model = UpsamplingDecoder().eval()  # `up`: 8 inputs, 6 outputs, a (8, 6, 2, 2) weight
    x = torch.randn(4, 3, 8, 8)
    group = next(g for g in PrunableGraph(model, x[:2]).groups() if g.name == "down")
    with torch.no_grad():
        model.up.weight[3] = 0.0  # the filters that read input channel 3
    stats = {"up": ReaderStats(torch.ones(8), 4)}
    score = unit_importance(group, stats, dict(model.named_modules()))  # before: an IndexError, 8 inputs > 6
    expected = model.up.weight.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(score, expected)
    assert score[3] == 0.0


class HeadsWithMergedTokens(nn.Module):
    """Per-head values written as ``reshape(batch * tokens, heads, head_dim)``, then merged back."""

    def __init__(self) -> None:
        super().__init__()
        self.value = nn.Linear(6, 8)
        self.project = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = x.shape
        heads = torch.relu(self.value(x)).reshape(batch * tokens, 2, -1)
        mixed = heads.softmax(dim=1) * heads  # each head's features weighed across heads
        return self.project(mixed.reshape(batch, tokens, -1))


def test_a_split_into_heads_that_also_merges_batch_and_tokens_keeps_the_units_whole():
    torch.manual_seed(0)
    model = HeadsWithMergedTokens().eval()
    kill_linear_units_(model.value, [1, 2])
    x = torch.randn(4, 5, 6)
    with torch.no_grad():
        before = model(x)
    groups = {group.name: group for group in PrunableGraph(model, x[:2]).groups()}
    assert "a reshape into 2×4 pieces" in (groups["value"].blocked or "")
    assert remove_dead_(model, x) == {}
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


class UpsamplingClassifierNet(nn.Module):
    """A decoder block in a classifier: conv ↓2, transposed conv ↑2 with BatchNorm, pooling, a head."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Conv1d(1, 8, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose1d(8, 12, 2, stride=2)
        self.norm = nn.BatchNorm1d(12)
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.up(torch.relu(self.down(x.unsqueeze(1))))))
        return self.head(h.mean(dim=2))


@pytest.mark.parametrize("regularizer", ["positive_group_l1", "l1_norm_scale"])
def test_a_target_shrinks_a_transposed_convolution_while_it_trains(tmp_path, regularizer):
    from helpers.lightning import train_with_callback
    from lightning_demp.demos import DemoClassifier

    class Classifier(DemoClassifier):
        def __init__(self) -> None:
            super().__init__(num_classes=3, optimizer="adam", lr=1e-2, lr_schedule="constant", weight_decay=0.0)
            self.net = UpsamplingClassifierNet()
            self.example_input_array = torch.zeros(2, 6)

    trainer, model, callback = train_with_callback(
        tmp_path, model=Classifier(), max_epochs=6, regularizer=regularizer, target_sparsity=0.5
    )
    assert model.net.up.out_channels < 12 and model.net.norm.num_features == model.net.up.out_channels
    optimizer = trainer.optimizers[0]
    for param in model.parameters():
        assert optimizer.state[param]["exp_avg"].shape == param.shape
