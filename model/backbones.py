"""Backbone bodies (Swin-T/S/B, ResNet-50) behind one FPN, so a comparison changes the body and nothing else.

Each body returns an OrderedDict of NCHW feature maps at strides 4, 8, 16, 32 named "0".."3"; the
shared `FpnBackbone` turns them into five 256-channel maps "0".."3" + "pool" (stride 64, LastLevelMaxPool),
which is what torchvision's RPN and MultiScaleRoIAlign expect.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.models import (ResNet50_Weights, Swin_B_Weights, Swin_S_Weights, Swin_T_Weights, SwinTransformer,
                                resnet50)
from torchvision.models._utils import IntermediateLayerGetter
from torchvision.ops import FrozenBatchNorm2d
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from core.errors import UserError, first_line

# torchvision's swin_t/s/b architectures (their factories fix stochastic depth, so build them directly).
SWIN_ARCHS = {
    "swin_t": {"embed_dim": 96, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24]},
    "swin_s": {"embed_dim": 96, "depths": [2, 2, 18, 2], "num_heads": [3, 6, 12, 24]},
    "swin_b": {"embed_dim": 128, "depths": [2, 2, 18, 2], "num_heads": [4, 8, 16, 32]},
}
# `model.backbone.weights: imagenet`: torchvision's ImageNet-1k classifier weights of each backbone.
IMAGENET = "imagenet"
IMAGENET_WEIGHTS = {"swin_t": Swin_T_Weights.IMAGENET1K_V1, "swin_s": Swin_S_Weights.IMAGENET1K_V1,
                    "swin_b": Swin_B_Weights.IMAGENET1K_V1, "resnet50": ResNet50_Weights.IMAGENET1K_V1}
# Indices in torchvision's SwinTransformer.features of the four stages (between them: PatchMerging).
SWIN_STAGE_INDICES = (1, 3, 5, 7)


class SwinStages(nn.Module):
    """The four stages of a torchvision Swin Transformer as NCHW maps at strides 4, 8, 16, 32.

    torchvision's Swin works in NHWC and has a single LayerNorm after the last stage; detection needs every
    stage, each normalized (as in the Swin paper's detection setup) and permuted to NCHW for the FPN.
    """

    def __init__(self, swin: nn.Module):
        super().__init__()
        self.features = swin.features  # patch embed, stage1, merge, stage2, merge, stage3, merge, stage4
        channels = [swin.features[i][-1].norm1.normalized_shape[0] for i in SWIN_STAGE_INDICES]
        self.norms = nn.ModuleList(nn.LayerNorm(c) for c in channels)
        self.out_channels_list = channels

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        out: OrderedDict[str, torch.Tensor] = OrderedDict()
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in SWIN_STAGE_INDICES:
                level = SWIN_STAGE_INDICES.index(i)
                out[str(level)] = self.norms[level](x).permute(0, 3, 1, 2).contiguous()
        return out


class FpnBackbone(nn.Module):
    """body -> FeaturePyramidNetwork, with autocast on CUDA only (outputs are cast back to float32)."""

    def __init__(self, body: nn.Module, in_channels_list: list[int], out_channels: int, amp: bool):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(in_channels_list, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels
        self.num_maps = len(in_channels_list) + 1  # + LastLevelMaxPool
        self.amp = amp

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp and x.is_cuda):
            features = self.fpn(self.body(x))
        return OrderedDict((name, f.float()) for name, f in features.items())


def imagenet_file(backbone: str) -> str:
    """The file name torchvision downloads the backbone's ImageNet weights to (the end of the enum's URL)."""
    return IMAGENET_WEIGHTS[backbone].url.rsplit("/", 1)[-1]


def imagenet_weights_path(backbone: str) -> Path:
    """torchvision's ImageNet weights of `backbone` in the torch hub cache (`torch.hub.get_dir()/checkpoints`),
    fetched there first when missing, as torchvision's own builders do (with its hash check). Offline, one
    line names the file and the folder to put it in, for a machine that cannot download."""
    url = IMAGENET_WEIGHTS[backbone].url
    name = imagenet_file(backbone)
    folder = Path(torch.hub.get_dir()) / "checkpoints"
    path = folder / name
    if not path.is_file():
        digest = torch.hub.HASH_REGEX.search(name)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            # Downloads to a temporary file beside `path` and renames it when complete and hash-checked.
            torch.hub.download_url_to_file(url, str(path), digest.group(1) if digest else None, progress=True)
        except Exception as exc:  # offline, a proxy, a full disk, a hash mismatch
            raise UserError(f"ImageNet weights for {backbone}: {name} is not in {folder} and could not be "
                            f"downloaded from {url} ({first_line(exc)}); put the file in that folder, or set "
                            "model.backbone.weights to its path") from None
    return path


def resolve_weights_path(spec: str, backbone: str) -> Path:
    """`imagenet` (torchvision's weights for `backbone`, see `imagenet_weights_path`), a local path, or a bare
    file name in the torch hub cache; only `imagenet` may download."""
    if spec == IMAGENET:
        return imagenet_weights_path(backbone)
    candidates = [Path(spec).expanduser()]
    if not Path(spec).is_absolute() and Path(spec).name == spec:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / spec)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(p) for p in candidates)
    raise UserError(f"pretrained backbone weights '{spec}' not found (looked at: {looked}); no download is attempted")


def load_classifier_weights(network: nn.Module, path: Path, drop_prefixes: tuple[str, ...]) -> None:
    """Load an ImageNet classifier state dict into `network`, strictly, minus its classification head."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated file, pickle with code, not a torch file...
        raise UserError(f"{path}: cannot load pretrained weights ({type(exc).__name__}: {first_line(exc)})") from None
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict):
        raise UserError(f"{path}: expected a state dict, got {type(state).__name__}")
    expected = {k for k in network.state_dict() if not k.startswith(drop_prefixes)}
    # BatchNorm's step counter is meaningless to FrozenBatchNorm, which has no such buffer.
    state = {
        k: v for k, v in state.items()
        if not k.startswith(drop_prefixes) and (k in expected or not k.endswith("num_batches_tracked"))
    }
    missing, unexpected = sorted(expected - state.keys()), sorted(state.keys() - expected)
    if missing or unexpected:
        raise UserError(
            f"{path}: not a {type(network).__name__} state dict for this backbone "
            f"({len(missing)} missing keys, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]})"
        )
    own = network.state_dict()
    bad = [k for k, v in state.items() if own[k].shape != v.shape]
    if bad:
        raise UserError(f"{path}: shape mismatch for {len(bad)} tensors, e.g. {bad[0]}: "
                        f"{tuple(state[bad[0]].shape)} vs {tuple(own[bad[0]].shape)} (another model size?)")
    network.load_state_dict(state, strict=False)


def swin_body(name: str, weights: str | None, drop_path_rate: float, trainable_stages: int,
              load_weights: bool) -> SwinStages:
    swin = SwinTransformer(
        patch_size=[4, 4], window_size=[7, 7], stochastic_depth_prob=drop_path_rate, **SWIN_ARCHS[name]
    )
    if weights and load_weights:
        load_classifier_weights(swin, resolve_weights_path(weights, name), drop_prefixes=("head.", "norm."))
    body = SwinStages(swin)
    # features[0] is the patch embedding (the "stem"); stage k sits at SWIN_STAGE_INDICES[k] with its
    # PatchMerging just before it, so freezing stage k freezes features[: index + 1].
    frozen = SWIN_STAGE_INDICES[3 - trainable_stages] + 1 if trainable_stages < 4 else 0
    for layer in list(body.features)[:frozen]:
        layer.requires_grad_(False)
    return body


def resnet_body(weights: str | None, trainable_stages: int, load_weights: bool) -> nn.Module:
    # FrozenBatchNorm only for pretrained weights: its statistics are meaningless on a random init. The
    # choice follows the config, not `load_weights`, so a checkpoint rebuilds the same layers.
    norm = FrozenBatchNorm2d if weights else nn.BatchNorm2d
    net = resnet50(weights=None, norm_layer=norm)
    if weights and load_weights:
        load_classifier_weights(net, resolve_weights_path(weights, "resnet50"), drop_prefixes=("fc.",))
    trainable = ["layer4", "layer3", "layer2", "layer1"][:trainable_stages]
    if trainable_stages == 4:
        trainable += ["conv1", "bn1"]  # the stem
    for name, param in net.named_parameters():
        if not any(name.startswith(t) for t in trainable):
            param.requires_grad_(False)
    return_layers = {"layer1": "0", "layer2": "1", "layer3": "2", "layer4": "3"}
    return IntermediateLayerGetter(net, return_layers=return_layers)


def build_backbone(config: dict[str, Any], load_weights: bool = True) -> FpnBackbone:
    """The FPN backbone described by `config["model"]`; `load_weights=False` skips the ImageNet file
    (a checkpoint is about to overwrite every tensor anyway)."""
    m = config["model"]
    b = m["backbone"]
    if b["name"] in SWIN_ARCHS:
        body = swin_body(b["name"], b["weights"], float(b["drop_path_rate"]), int(b["trainable_stages"]),
                         load_weights)
        channels = body.out_channels_list
    else:
        body = resnet_body(b["weights"], int(b["trainable_stages"]), load_weights)
        channels = [256, 512, 1024, 2048]
    return FpnBackbone(body, channels, int(m["fpn_channels"]), bool(m["amp"]))
