"""Model foundation: architecture, sizes, losses, pretrained loading, optimizer groups, checkpoints."""

from __future__ import annotations

from pathlib import Path
from urllib.error import URLError

import pytest
import torch
from torch import nn
from torchvision.models import resnet50, swin_t
from torchvision.models.swin_transformer import ShiftedWindowAttention

from model.backbones import imagenet_file
from model.builder import build_model
from model.checkpoint import load_checkpoint, save_checkpoint
from model.config import load_config
from core.errors import UserError
from model.optim import build_optimizer, build_scheduler, lr_factor


def config_for(backbone: str, classes: list[str] | None = None, **model_overrides) -> dict:
    overrides = {"model": {"backbone": {"name": backbone}, **model_overrides}}
    if classes is not None:
        overrides["classes"] = classes
    return load_config(overrides=overrides)


def n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def swin_model() -> nn.Module:
    torch.manual_seed(0)
    return build_model(config_for("swin_t", ["building", "tree"]))


def test_parameter_counts_match_published_models():
    swin = n_params(build_model(config_for("swin_t"), num_classes=90))  # 90 + background = COCO's 91
    r50 = n_params(build_model(config_for("resnet50"), num_classes=90))
    assert abs(swin - 47.8e6) / 47.8e6 < 0.01, swin
    assert abs(r50 - 44.4e6) / 44.4e6 < 0.01, r50
    for name in ("swin_s", "swin_b"):
        assert n_params(build_model(config_for(name), num_classes=1)) > swin


@pytest.mark.parametrize("backbone", ["swin_t", "resnet50"])
def test_fpn_gives_five_maps_at_strides_4_to_64(backbone):
    model = build_model(config_for(backbone), num_classes=1).eval()
    with torch.inference_mode():
        maps = model.backbone(torch.rand(1, 3, 256, 320))
    assert list(maps) == ["0", "1", "2", "3", "pool"]
    for (name, fmap), stride in zip(maps.items(), (4, 8, 16, 32, 64)):
        assert fmap.shape == (1, 256, 256 // stride, 320 // stride), (name, fmap.shape)
        assert fmap.dtype == torch.float32


def test_swin_stage_maps_are_nchw_with_swin_t_channels(swin_model):
    with torch.inference_mode():
        stages = swin_model.backbone.body(torch.rand(1, 3, 128, 192))
    shapes = [tuple(s.shape) for s in stages.values()]
    assert shapes == [(1, 96, 32, 48), (1, 192, 16, 24), (1, 384, 8, 12), (1, 768, 4, 6)]


def test_any_input_size_works_and_tiles_are_not_resized(swin_model):
    swin_model.eval()
    with torch.inference_mode():
        out = swin_model([torch.rand(3, 100, 157), torch.rand(3, 130, 90)])
        images, _ = swin_model.transform([torch.rand(3, 512, 512)])
    assert out[0]["masks"].shape[1:] == (1, 100, 157)
    assert out[1]["masks"].shape[1:] == (1, 130, 90)
    assert images.image_sizes == [(512, 512)]  # not upscaled to 800


def _target(h: int, w: int) -> dict:
    masks = torch.zeros(2, h, w, dtype=torch.uint8)
    masks[0, 10:40, 12:50] = 1
    masks[1, 60:90, 70:100] = 1
    return {
        "boxes": torch.tensor([[12.0, 10.0, 50.0, 40.0], [70.0, 60.0, 100.0, 90.0]]),
        "labels": torch.tensor([1, 2]),
        "masks": masks,
    }


@pytest.mark.parametrize("backbone", ["swin_t", "resnet50"])
def test_train_mode_returns_five_finite_losses(backbone):
    torch.manual_seed(0)
    model = build_model(config_for(backbone, ["a", "b"])).train()
    losses = model([torch.rand(3, 128, 112)], [_target(128, 112)])
    assert set(losses) == {"loss_classifier", "loss_box_reg", "loss_mask", "loss_objectness", "loss_rpn_box_reg"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()


def test_eval_mode_returns_masks_at_input_size():
    torch.manual_seed(0)
    model = build_model(config_for("swin_t", ["a"], box_score_thresh=0.0)).eval()
    with torch.inference_mode():
        (out,) = model([torch.rand(3, 96, 128)])
    n = len(out["boxes"])
    assert n > 0  # random weights with threshold 0 still propose boxes
    assert out["boxes"].shape == (n, 4) and out["labels"].dtype == torch.int64 and out["scores"].shape == (n,)
    assert out["masks"].shape == (n, 1, 96, 128) and out["masks"].dtype == torch.float32


def test_anchor_sizes_must_match_feature_maps():
    cfg = config_for("swin_t", ["a"], anchor_sizes=[[32], [64], [128], [256]])
    with pytest.raises(UserError, match="4 entries but the FPN gives 5"):
        build_model(cfg)


def test_pretrained_swin_weights_round_trip(tmp_path):
    torch.manual_seed(1)
    reference = swin_t().state_dict()
    path = tmp_path / "swin_t-test.pth"
    torch.save(reference, path)
    model = build_model(load_config(overrides={"classes": ["a"], "model": {"backbone": {"weights": str(path)}}}))
    loaded = model.backbone.body.features.state_dict()
    for key, value in loaded.items():
        assert torch.equal(value, reference[f"features.{key}"]), key


def test_pretrained_weights_with_wrong_keys_or_missing_file_fail_clearly(tmp_path):
    wrong = tmp_path / "resnet.pth"
    torch.save(resnet50().state_dict(), wrong)
    cfg = {"classes": ["a"], "model": {"backbone": {"weights": str(wrong)}}}
    with pytest.raises(UserError, match="not a SwinTransformer state dict"):
        build_model(load_config(overrides=cfg))
    cfg["model"]["backbone"]["weights"] = "no-such-file.pth"
    with pytest.raises(UserError, match="not found .looked at: .*no-such-file.pth"):
        build_model(load_config(overrides=cfg))


@pytest.fixture
def offline_hub(tmp_path, monkeypatch) -> Path:
    """An empty torch hub cache in TORCH_HOME and no network: any download raises, as on a machine offline."""
    def no_network(url, dst, *args, **kwargs):
        raise URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_network)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_imagenet_weights_name_torchvisions_files():
    assert {name: imagenet_file(name) for name in ("swin_t", "swin_s", "swin_b", "resnet50")} == {
        "swin_t": "swin_t-704ceda3.pth", "swin_s": "swin_s-5e29d889.pth", "swin_b": "swin_b-68c6b09e.pth",
        "resnet50": "resnet50-0676ba61.pth"}


def test_imagenet_weights_load_from_the_torch_hub_cache(offline_hub):
    torch.manual_seed(2)
    reference = swin_t().state_dict()  # random weights under torchvision's file name
    offline_hub.mkdir(parents=True)
    torch.save(reference, offline_hub / "swin_t-704ceda3.pth")
    model = build_model(load_config(overrides={"classes": ["a"], "model": {"backbone": {"weights": "imagenet"}}}))
    for key, value in model.backbone.body.features.state_dict().items():
        assert torch.equal(value, reference[f"features.{key}"]), key


def test_imagenet_weights_are_fetched_into_the_cache_when_missing(offline_hub, monkeypatch):
    torch.manual_seed(3)
    reference = resnet50().state_dict()
    fetched = []

    def download(url, dst, hash_prefix=None, progress=True):
        fetched.append((url, Path(dst).parent, hash_prefix))
        torch.save(reference, dst)

    monkeypatch.setattr(torch.hub, "download_url_to_file", download)
    config = load_config(overrides={"classes": ["a"], "model": {"backbone": {"name": "resnet50",
                                                                             "weights": "imagenet"}}})
    model = build_model(config)
    assert fetched == [("https://download.pytorch.org/models/resnet50-0676ba61.pth", offline_hub, "0676ba61")]
    assert torch.equal(model.backbone.body["layer4"][2].conv3.weight, reference["layer4.2.conv3.weight"])
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.backbone.body.modules())  # frozen, as pretrained


def test_imagenet_weights_offline_name_the_file_and_the_folder(offline_hub):
    config = load_config(overrides={"classes": ["a"], "model": {"backbone": {"name": "swin_s",
                                                                             "weights": "imagenet"}}})
    with pytest.raises(UserError) as caught:
        build_model(config)
    message = str(caught.value)
    assert "\n" not in message and "swin_s-5e29d889.pth" in message and f"{offline_hub}" in message
    assert "https://download.pytorch.org/models/swin_s-5e29d889.pth" in message and "name resolution" in message
    assert not offline_hub.exists() or not any(offline_hub.iterdir())  # nothing half-written left behind


def test_pretrained_resnet_uses_frozen_batchnorm(tmp_path):
    path = tmp_path / "r50.pth"
    torch.save(resnet50().state_dict(), path)
    model = build_model(load_config(overrides={"classes": ["a"], "model": {"backbone": {
        "name": "resnet50", "weights": str(path)}}}))
    norms = [type(m).__name__ for m in model.backbone.body.modules() if "BatchNorm" in type(m).__name__]
    assert norms and set(norms) == {"FrozenBatchNorm2d"}


def test_no_weight_decay_on_norms_biases_and_position_tables(swin_model):
    optimizer = build_optimizer(swin_model, config_for("swin_t", ["a"]))
    decay_of = {id(p): g["weight_decay"] for g in optimizer.param_groups for p in g["params"]}
    checked = 0
    for module in swin_model.modules():
        for name, param in module.named_parameters(recurse=False):
            if isinstance(module, (nn.LayerNorm, nn.BatchNorm2d)) or name == "bias" or (
                isinstance(module, ShiftedWindowAttention) and name == "relative_position_bias_table"
            ):
                assert decay_of[id(param)] == 0.0, name
                checked += 1
            elif name == "weight" and isinstance(module, (nn.Linear, nn.Conv2d)):
                assert decay_of[id(param)] == 0.05
    assert checked > 100
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["lr"] == 1e-4


def test_schedule_warms_up_then_steps():
    schedule = {"warmup_iters": 10, "warmup_factor": 0.001, "milestones": [0.5, 0.75], "gamma": 0.1}
    assert lr_factor(0, 100, schedule) == pytest.approx(0.001)
    assert lr_factor(5, 100, schedule) == pytest.approx(0.5005)
    assert lr_factor(10, 100, schedule) == 1.0
    assert lr_factor(50, 100, schedule) == pytest.approx(0.1)
    assert lr_factor(80, 100, schedule) == pytest.approx(0.01)
    cfg = load_config(overrides={"optimizer": {"name": "sgd", "lr": 0.02}})
    opt = build_optimizer(nn.Linear(2, 2), cfg)
    sched = build_scheduler(opt, cfg, total_iters=1000)
    assert isinstance(opt, torch.optim.SGD) and opt.param_groups[0]["lr"] == pytest.approx(0.02 * 0.001)
    opt.step()
    sched.step()
    assert opt.param_groups[0]["lr"] > 0.02 * 0.001


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path, swin_model):
    cfg = config_for("swin_t", ["building", "tree"])
    path = tmp_path / "model.pt"
    save_checkpoint(path, swin_model, cfg, ["building", "tree"])
    restored, payload = load_checkpoint(path, cfg)
    assert payload["class_names"] == ["building", "tree"]
    x = [torch.rand(3, 96, 96)]
    swin_model.eval()
    with torch.inference_mode():
        a, b = swin_model(x)[0], restored(x)[0]
    for key in ("boxes", "scores", "labels", "masks"):
        assert torch.equal(a[key], b[key]), key


def test_mismatched_checkpoint_names_the_mismatch(tmp_path, swin_model):
    path = tmp_path / "model.pt"
    save_checkpoint(path, swin_model, config_for("swin_t", ["building", "tree"]), ["building", "tree"])
    with pytest.raises(UserError, match="backbone is swin_t but the config asks for resnet50"):
        load_checkpoint(path, config_for("resnet50", ["building", "tree"]))
    with pytest.raises(UserError, match="classes .*building.*tree.* differ .*car"):
        load_checkpoint(path, config_for("swin_t", ["car"]))


def test_bad_checkpoint_files_fail_clearly(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    truncated = tmp_path / "truncated.pt"
    torch.save({"format_version": 1, "model": {"w": torch.zeros(1000)}}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(UserError, match="not a readable checkpoint"):
        load_checkpoint(truncated)
    evil = tmp_path / "evil.pt"
    torch.save({"format_version": 1, "payload": nn.Linear(2, 2)}, evil)  # a pickled object, not plain data
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(evil)
