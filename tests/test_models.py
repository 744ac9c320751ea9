"""CIFAR models, the CIFAR-10 data module and the CIFAR configs: shapes, parameter counts, surgery, loading."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_surgery import remove_dead_
from torch import nn

from helpers.models import kill_bn_units_, kill_linear_units_, randomize_bn_
from lightning_demp.cli import main
from lightning_demp.demos.cifar import CIFAR10_MEAN, CIFAR10_STD, CIFAR10DataModule, CIFAR10Dataset, augment_image
from lightning_demp.demos.cifar_models import (
    CIFARResNet18Classifier,
    CIFARVGG16Classifier,
    cifar_resnet18,
    cifar_vgg16_bn,
)
from lightning_demp.selection import ChannelSelect

REPO = Path(__file__).resolve().parents[1]


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------------------------------------------- models
def test_resnet18_shape_and_parameter_count():
    model = cifar_resnet18().eval()
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert 11_100_000 <= count(model) <= 11_300_000
    assert count(model) == 11_173_962
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1)
    assert isinstance(model.layer1[0].shortcut, ChannelSelect)  # identity shortcuts are selections
    assert isinstance(model.layer2[0].shortcut, nn.Sequential)
    assert cifar_resnet18(num_classes=100).fc.out_features == 100


def test_vgg16_bn_shape_and_parameter_count():
    # Standard VGG-16-BN convs (weight + bias), 3x3 kernels:
    #   3*64*9+64 = 1,792          64*64*9+64 = 36,928
    #   64*128*9+128 = 73,856      128*128*9+128 = 147,584
    #   128*256*9+256 = 295,168    2 x (256*256*9+256) = 1,180,160
    #   256*512*9+512 = 1,180,160  5 x (512*512*9+512) = 11,799,040       convs: 14,714,688
    # BatchNorm2d scale + shift: 2 * (2*64 + 2*128 + 3*256 + 6*512) = 8,448
    # Classifier: 512*4096+4096 = 2,101,248; 4096*4096+4096 = 16,781,312; 4096*10+10 = 40,970   -> 18,923,530
    # Total: 14,714,688 + 8,448 + 18,923,530 = 33,646,666
    model = cifar_vgg16_bn().eval()
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert count(model) == 33_646_666
    assert sum(isinstance(m, nn.Conv2d) for m in model.modules()) == 13
    assert sum(isinstance(m, nn.Linear) for m in model.modules()) == 3


def test_vgg16_bn_demp_variant_parameter_count():
    # The authors' sizes: the 13th conv is 512 -> 1024 (512*1024*9+1024 = 4,719,616 instead of 2,359,808), so
    #   convs 14,714,688 - 2,359,808 + 4,719,616 = 17,074,496; BatchNorm2d 8,448 + 2*512 = 9,472;
    #   classifier 1024*4096+4096 = 4,198,400; BN1d 8,192; 16,781,312; BN1d 8,192; 40,970 -> 21,037,066
    # Total: 17,074,496 + 9,472 + 21,037,066 = 38,121,034
    model = cifar_vgg16_bn(variant="demp").eval()
    assert model(torch.randn(4, 3, 32, 32)).shape == (4, 10)
    assert count(model) == 38_121_034
    with pytest.raises(ValueError, match="variant"):
        cifar_vgg16_bn(variant="vgg19")  # type: ignore[arg-type]


def test_conv_weights_use_kaiming_normal_fan_out():
    model = cifar_resnet18()
    weight = model.layer4[1].conv2.weight
    expected_std = (2.0 / (weight.shape[0] * 9)) ** 0.5
    assert weight.std().item() == pytest.approx(expected_std, rel=0.02)


def test_lightning_modules_wrap_the_networks_and_set_the_example_input():
    resnet = CIFARResNet18Classifier()
    assert count(resnet.net) == 11_173_962
    assert tuple(resnet.example_input_array.shape) == (2, 3, 32, 32)
    assert resnet.hparams["lr_schedule"] == "step" and resnet.hparams["lr"] == 5e-3
    vgg = CIFARVGG16Classifier(variant="demp", num_classes=100)
    assert vgg.net.classifier[-1].out_features == 100
    with pytest.raises(ValueError, match="lr_schedule"):
        CIFARResNet18Classifier(lr_schedule="cubic")  # type: ignore[arg-type]


def test_step_schedule_decays_the_learning_rate_every_n_epochs():
    model = CIFARResNet18Classifier(lr=0.1, lr_step_epochs=2, lr_step_gamma=0.2)
    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.AdamW)
    assert config["lr_scheduler"]["interval"] == "epoch"
    assert model.lr_schedule == "step"
    lrs = []
    for _ in range(5):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.1, 0.1, 0.02, 0.02, 0.004])


# ---------------------------------------------------------------------------------------------------- surgery
def planted_widths(model: nn.Module) -> dict[str, int]:
    return {name: m.out_features if isinstance(m, nn.Linear) else m.out_channels
            for name, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}  # fmt: skip


def calibrate_bn_(model: nn.Module, inputs: torch.Tensor) -> None:
    """Random BatchNorm scales and shifts (alive: shift ≈ 2), then running statistics measured on ``inputs``."""
    randomize_bn_(model)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average
    model.train()
    with torch.no_grad():
        model(inputs)
    for norm in norms:
        norm.momentum = 0.1
    model.eval()


def make_classifier_alive_(model: nn.Module, inputs: torch.Tensor) -> None:
    """Raise the shift before each ReLU of a VGG classifier so that every hidden unit is active on ``inputs``."""
    model.eval()
    with torch.no_grad():
        x = model.features(inputs).flatten(1)
        layers = list(model.classifier)
        for layer, following in zip(layers, [*layers[1:], None]):
            if isinstance(following, nn.ReLU):
                layer.bias += (1.0 - layer(x).amin(dim=0)).clamp(min=0.0)
            x = layer(x)


def check_removal(model: nn.Module, inputs: torch.Tensor, planted: dict[str, list[int]], bns: dict[str, str]) -> None:
    """Remove dead units; outputs must be unchanged and exactly the planted units gone (with their BN entries)."""
    model.eval()
    modules = dict(model.named_modules())
    widths = planted_widths(model)
    bn_before = {name: modules[bn].weight.detach().clone() for name, bn in bns.items()}
    with torch.no_grad():
        expected = model(inputs)

    removed = remove_dead_(model, inputs)

    assert removed == {name: len(units) for name, units in planted.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(inputs), expected, rtol=1e-4, atol=1e-4)
    modules = dict(model.named_modules())
    for name, units in planted.items():
        assert planted_widths(model)[name] == widths[name] - len(units)
        kept = [i for i in range(widths[name]) if i not in units]
        if name in bns:
            torch.testing.assert_close(modules[bns[name]].weight.detach(), bn_before[name][kept])


def test_resnet18_surgery_removes_planted_channels_and_keeps_outputs():
    model, inputs = cifar_resnet18(), torch.randn(4, 3, 32, 32)
    calibrate_bn_(model, inputs)
    planted = {"layer1.0.conv1": [0, 5, 17], "layer2.0.conv1": [7], "layer4.1.conv1": [1, 300, 511]}
    bns = {name: name.replace("conv1", "bn1") for name in planted}
    for name, units in planted.items():
        kill_bn_units_(dict(model.named_modules())[bns[name]], units)
    check_removal(model, inputs, planted, bns)
    assert model.layer1[0].conv2.in_channels == 61 and model.layer2[0].conv2.in_channels == 127


@pytest.mark.parametrize("variant", ["standard", "demp"])
def test_vgg16_surgery_removes_planted_units_and_keeps_outputs(variant):
    model, inputs = cifar_vgg16_bn(variant=variant), torch.randn(4, 3, 32, 32)
    calibrate_bn_(model, inputs)
    modules = dict(model.named_modules())
    # The first and the last conv (features.40 in both variants), each followed by its BatchNorm.
    planted = {"features.0": [3, 10], "features.40": [0, 2, 200]}
    bns = {"features.0": "features.1", "features.40": "features.41"}
    for name, units in planted.items():
        kill_bn_units_(modules[bns[name]], units)
    make_classifier_alive_(model, inputs)  # random hidden units can be silent on 4 images; only planted ones are
    planted["classifier.0"] = [4, 4095]
    if variant == "demp":  # Linear -> BatchNorm1d -> ReLU
        kill_bn_units_(modules["classifier.1"], [4, 4095])
        bns["classifier.0"] = "classifier.1"
    else:  # Linear -> ReLU
        kill_linear_units_(modules["classifier.0"], [4, 4095])
    check_removal(model, inputs, planted, bns)
    assert model.classifier[0].in_features == (509 if variant == "standard" else 1021)


# ---------------------------------------------------------------------------------------------------- data
def write_fake_cifar(folder: Path, samples: int = 20) -> dict[str, dict[bytes, object]]:
    """Write data_batch_1..5 and test_batch as the CIFAR-10 python version does (pickle protocol 2, bytes keys)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, samples).tolist(),
            b"data": rng.integers(0, 256, (samples, 3072), dtype=np.uint8),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(samples)],
        }
        with open(folder / name, "wb") as file:
            pickle.dump(batch, file, protocol=2)
        batches[name] = batch
    return batches


def normalized(raw: np.ndarray) -> torch.Tensor:
    image = torch.as_tensor(raw, dtype=torch.float32).reshape(3, 32, 32) / 255.0
    return (image - torch.tensor(CIFAR10_MEAN).view(3, 1, 1)) / torch.tensor(CIFAR10_STD).view(3, 1, 1)


@pytest.mark.parametrize("give_parent", [False, True])
def test_datamodule_reads_the_python_batches(tmp_path, give_parent):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    data_dir = tmp_path if give_parent else tmp_path / "cifar-10-batches-py"
    data = CIFAR10DataModule(str(data_dir), batch_size=8, num_workers=0)
    data.prepare_data()
    data.setup("fit")
    assert data.train_set is not None and data.test_set is not None
    assert len(data.train_set) == 100 and len(data.test_set) == 20
    assert data.val_set is data.test_set
    image, label = data.train_set[0]
    assert image.shape == (3, 32, 32) and image.dtype == torch.float32
    assert label.dtype == torch.long and int(label) == batches["data_batch_1"][b"labels"][0]
    assert int(data.train_set[20][1]) == batches["data_batch_2"][b"labels"][0]  # batches concatenated in order
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (8, 3, 32, 32) and x.dtype == torch.float32 and y.shape == (8,) and y.dtype == torch.long


def test_test_images_are_normalized_and_never_augmented(tmp_path):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    data = CIFAR10DataModule(str(tmp_path), num_workers=0)
    data.setup("test")
    assert data.test_set is not None and not data.test_set.augment
    for index in (0, 7):
        expected = normalized(batches["test_batch"][b"data"][index])
        for _ in range(3):
            torch.testing.assert_close(data.test_set[index][0], expected)
    x, y = next(iter(data.test_dataloader()))
    torch.testing.assert_close(x[0], normalized(batches["test_batch"][b"data"][0]))
    assert y.tolist() == batches["test_batch"][b"labels"]


def test_training_augmentation_changes_images_but_keeps_their_shape(tmp_path):
    batches = write_fake_cifar(tmp_path / "cifar-10-batches-py")
    data = CIFAR10DataModule(str(tmp_path), num_workers=0)
    data.setup("fit")
    assert data.train_set is not None and data.train_set.augment
    plain = normalized(batches["data_batch_1"][b"data"][3])
    draws = [data.train_set[3][0] for _ in range(10)]
    assert all(draw.shape == (3, 32, 32) and draw.dtype == torch.float32 for draw in draws)
    assert any(not torch.equal(draw, plain) for draw in draws)
    # The values stay those of the image: a crop of its reflection, so every value comes from the image.
    assert all(torch.isin(draw, plain).all() for draw in draws)
    # Same seed, same augmentation (Lightning's seeding applies).
    torch.manual_seed(1)
    first = data.train_set[3][0]
    torch.manual_seed(1)
    torch.testing.assert_close(data.train_set[3][0], first)
    unaugmented = CIFAR10DataModule(str(tmp_path), num_workers=0, augment=False)
    unaugmented.setup("fit")
    assert unaugmented.train_set is not None
    torch.testing.assert_close(unaugmented.train_set[3][0], plain)


def test_augment_image_without_padding_only_flips():
    image = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(2, 4, 4)
    seen = set()
    for _ in range(20):
        out = augment_image(image, padding=0)
        assert torch.equal(out, image) or torch.equal(out, image.flip(-1))
        seen.add(torch.equal(out, image))
    assert seen == {True, False}


def test_validation_split_holds_out_unaugmented_training_images(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    data = CIFAR10DataModule(str(tmp_path), num_workers=0, val_split=30)
    data.setup("fit")
    assert data.train_set is not None and data.val_set is not None
    assert len(data.train_set) == 70 and len(data.val_set) == 30
    assert data.train_set.augment and not data.val_set.augment
    assert data.val_set is not data.test_set


def test_missing_folder_raises_a_helpful_file_not_found_error(tmp_path):
    missing = tmp_path / "nowhere"
    data = CIFAR10DataModule(str(missing))
    with pytest.raises(FileNotFoundError, match="CIFAR-10 python version") as info:
        data.setup("fit")
    assert str(missing) in str(info.value)
    assert "extract" in str(info.value)
    assert not missing.exists()  # nothing created, nothing downloaded


def test_partial_folder_names_the_missing_files(tmp_path):
    write_fake_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match="data_batch_3"):
        CIFAR10DataModule(str(tmp_path)).setup("fit")


def test_dataset_rejects_float_images():
    with pytest.raises(ValueError, match="uint8"):
        CIFAR10Dataset(torch.zeros(2, 3, 32, 32), torch.zeros(2))


# ---------------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["cifar10_resnet18.yaml", "cifar10_vgg16.yaml"])
def test_cifar_configs_parse(name, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["lightning-demp"])  # LightningCLI warns when pytest's own arguments are there
    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "configs" / name), "--print_config"])
    assert info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "lightning_demp.demos.cifar.CIFAR10DataModule" in out
    assert "l1_norm_scale" in out and "one_cycle" in out
