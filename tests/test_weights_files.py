"""Pretrained weights from files (offline clusters): CIFAR-10's ``--model.weights PATH`` (any
state-dict file of the architecture; the official SWAG file name is checked against its hash) and
ImageNet's timm weights file; every bad file is one error line."""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CIFAR-10"))
sys.path.insert(0, str(ROOT / "ImageNet1K"))

import cifar  # noqa: E402
import imagenet  # noqa: E402

from common.config import Config, load_config  # noqa: E402
from common.errors import UserError  # noqa: E402

TINY_VIT = {"patch_size": 8, "num_layers": 1, "num_heads": 2, "hidden_dim": 16, "mlp_dim": 32}


def vit_cfg(weights: str, image_size: int = 16, arch: str = "custom", **custom) -> Config:
    return Config(load_config(ROOT / "CIFAR-10" / "config.yaml", "faithful",
                              {"model.arch": arch, "model.weights": weights, "model.image_size": image_size,
                               "model.custom": {**TINY_VIT, **custom}}))


def pretrained_tiny_vit(image_size: int = 32, classes: int = 7):
    """A small ViT 'pretrained' at another resolution (4 x 4 patches) with another head, as SWAG is."""
    from torchvision.models.vision_transformer import VisionTransformer

    torch.manual_seed(3)
    return VisionTransformer(image_size=image_size, num_classes=classes, **TINY_VIT)


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_vit_weights_from_a_state_dict_file(tmp_path, suffix):
    source = pretrained_tiny_vit()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".pth":
        torch.save(source.state_dict(), path)
    else:
        from safetensors.torch import save_file

        save_file(source.state_dict(), str(path))
    model = cifar.build_vit(vit_cfg(str(path)))  # 16 px: 2 x 2 patches
    want = source.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith("encoder.") and name != "encoder.pos_embedding":
            torch.testing.assert_close(tensor, want[name], rtol=0, atol=0)
    pos = model.encoder.pos_embedding
    assert pos.shape == (1, 1 + 2 * 2, 16) and torch.equal(pos[:, 0], want["encoder.pos_embedding"][:, 0])
    torch.testing.assert_close(pos, cifar.resize_pos_embedding(want["encoder.pos_embedding"], 2))
    assert model.heads.head.out_features == 10 and model.seq_length == 5
    assert model(torch.randn(2, 3, 16, 16)).shape == (2, 10)
    bare = cifar.build_vit(vit_cfg(str(path)), pretrained=False)  # the skeleton a checkpoint is loaded into
    assert {k: v.shape for k, v in bare.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_official_file_name_is_checked_against_its_hash(tmp_path):
    source = pretrained_tiny_vit()
    staged = tmp_path / "staged.pth"
    torch.save(source.state_dict(), staged)
    prefix = hashlib.sha256(staged.read_bytes()).hexdigest()[:8]
    named = tmp_path / f"tiny_vit-{prefix}.pth"  # torch.hub's convention: name-<sha256 prefix>.ext
    staged.rename(named)
    state = cifar._state_dict_file(named, official=named.name, url="https://example.invalid/x.pth")
    assert torch.equal(state["class_token"], source.state_dict()["class_token"])
    named.write_bytes(named.read_bytes() + b"\0")  # one byte more: damaged
    with pytest.raises(UserError, match=f"not the {prefix}... its official name promises"):
        cifar._state_dict_file(named, official=named.name, url="https://example.invalid/x.pth")
    # the real name: an impostor under the official file name is refused before it is read
    impostor = tmp_path / "vit_h_14_swag-80465313.pth"
    torch.save(source.state_dict(), impostor)
    cfg = vit_cfg(str(impostor), image_size=384, arch="vit_h_14")
    with pytest.raises(UserError, match="not the 80465313... its official name promises") as err:
        cifar.build_vit(cfg)
    assert "download https://download.pytorch.org/models/vit_h_14_swag-80465313.pth" in str(err.value)


def test_bad_vit_weights_files_are_one_line(tmp_path):
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    other = tmp_path / "wider.pth"  # a ViT of another width
    torch.save(pretrained_tiny_vit().state_dict(), tmp_path / "tiny.pth")
    from torchvision.models.vision_transformer import VisionTransformer

    torch.save(VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2, hidden_dim=24,
                                 mlp_dim=32).state_dict(), other)
    cases = {"missing.pth": "model.weights file .*missing.pth not found",
             "garbage.pth": "garbage.pth is not a state-dict file",
             "list.pth": "list.pth is not a state dict .* but a list",
             "wider.pth": "wider.pth is not a state dict of this custom .*size mismatch"}
    for name, message in cases.items():
        with pytest.raises(UserError, match=message) as err:
            cifar.build_vit(vit_cfg(str(tmp_path / name)))
        assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not a state dict of this custom .*(Missing|Unexpected)"):  # another depth
        cifar.build_vit(vit_cfg(str(tmp_path / "tiny.pth"), num_layers=2))
    # the real ViT-H/14 (shapes only, on the meta device) refuses a small ViT's file
    cfg = vit_cfg(str(tmp_path / "tiny.pth"), image_size=384, arch="vit_h_14")
    with torch.device("meta"), pytest.raises(UserError, match="is not a state dict of this vit_h_14"):
        cifar.build_vit(cfg)


def test_imagenet_takes_a_timm_weights_file(tmp_path):
    """What ImageNet1K already does with a path in model.weights (timm's pretrained_cfg file)."""
    import timm
    from safetensors.torch import save_file

    cfg = load_config(ROOT / "ImageNet1K" / "config.yaml", "faithful", {"model.name": "convnextv2_atto"})
    torch.manual_seed(0)
    source = timm.create_model("convnextv2_atto", pretrained=False, num_classes=1000)
    save_file(source.state_dict(), str(tmp_path / "model.safetensors"))
    torch.save({"model": source.state_dict()}, tmp_path / "wrapped.pth")  # timm unwraps 'model' / 'state_dict'
    for name in ("model.safetensors", "wrapped.pth"):
        cfg["model"]["weights"] = str(tmp_path / name)
        model = imagenet.build_convnext(Config(cfg), pretrained=True)
        assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
    torch.save(timm.create_model("convnextv2_femto", pretrained=False).state_dict(), tmp_path / "femto.pth")
    for name, message in (("femto.pth", "are not convnextv2_atto weights"), ("nowhere.pth", "not found")):
        cfg["model"]["weights"] = str(tmp_path / name)
        with pytest.raises(UserError, match=message):
            imagenet.build_convnext(Config(cfg), pretrained=True)


def test_bad_imagenet_weights_files_are_one_line_that_says_what_is_wrong(tmp_path):
    """A torch.save file of a list, a file that is no tensor file, and weights of another
    architecture: each one error line; a mismatch names the keys that differ."""
    import timm

    cfg = load_config(ROOT / "ImageNet1K" / "config.yaml", "faithful", {"model.name": "convnextv2_atto"})
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    (tmp_path / "garbage.pth").write_bytes(b"this is not a checkpoint")
    torch.manual_seed(0)
    state = timm.create_model("convnextv2_atto", pretrained=False, num_classes=1000).state_dict()
    torch.save({k: v for k, v in state.items() if k != "head.fc.bias"}, tmp_path / "short.pth")
    torch.save({"state_dict": {"nothing.here": torch.zeros(1)}}, tmp_path / "foreign.pth")
    cases = {"list.pth": r"list.pth is not a state dict .* but a list",
             "garbage.pth": r"garbage.pth is not a state-dict file",
             "short.pth": r"are not convnextv2_atto weights \(Missing key\(s\) in state_dict: \"head.fc.bias\"",
             "foreign.pth": r"are not convnextv2_atto weights \(.*stem.0.weight"}
    for name, message in cases.items():
        cfg["model"]["weights"] = str(tmp_path / name)
        with pytest.raises(UserError, match=message) as err:
            imagenet.build_convnext(Config(cfg), pretrained=True)
        assert "\n" not in str(err.value)
