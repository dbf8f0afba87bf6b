"""Standard MONAI networks (DenseNet121, ResNet-18/34), 2-D, one input channel per view, made
Opacus-compatible: GroupNorm instead of BatchNorm (BatchNorm mixes patients within a batch, so
per-sample gradients are undefined), no in-place operations on hooked outputs. Random
initialisation only: no downloaded weights.

MONAI's ResNet does not pass `norm` on to its residual stages, so the BatchNorm layers are
replaced after construction rather than trusted to the constructor argument. MONAI is imported
when a network is built (it takes seconds), so the small-CNN default starts as fast as before.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
from torch import nn

from spine_fl.shared.models.small_cnn import logit_head

GROUPS = 32  # GroupNorm groups (the usual choice; fewer where a layer has fewer channels)
NO_INPLACE_RELU = ("relu", {"inplace": False})


@functools.cache
def _block() -> type[nn.Module]:
    from monai.networks.nets.resnet import ResNetBlock

    class Block(ResNetBlock):
        """MONAI's basic residual block with an out-of-place residual sum: Opacus' backward hooks
        refuse a hooked layer's output modified in place (`out += residual`)."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
            residual = x if self.downsample is None else self.downsample(x)
            return self.act(out + residual)

    return Block


def group_norm_everywhere(module: nn.Module, groups: int = GROUPS) -> nn.Module:
    """Replace every BatchNorm by GroupNorm (affine) and every in-place ReLU by an out-of-place one."""
    for name, child in module.named_children():
        if isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(module, name, nn.GroupNorm(math.gcd(groups, child.num_features), child.num_features))
        else:
            if isinstance(child, nn.ReLU):
                child.inplace = False
            group_norm_everywhere(child, groups)
    return module


class _ResNetEncoder(nn.Module):
    def __init__(self, layers: list[int], n_views: int):
        from monai.networks.nets.resnet import ResNet, get_inplanes

        super().__init__()
        # the ImageNet-style stem (7x7 conv, stride 2, max pool), as the 2-D spine studies use
        self.net = group_norm_everywhere(ResNet(
            _block(), layers, get_inplanes(), spatial_dims=2, n_input_channels=n_views, conv1_t_size=7,
            conv1_t_stride=2, feed_forward=False, bias_downsample=False, act=NO_INPLACE_RELU,
            norm=("group", {"num_groups": GROUPS})))
        self.out_features = get_inplanes()[-1] * _block().expansion

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """MONAI's ResNet.forward without its last `view(batch, -1)`, which an empty batch cannot
        take; DP-SGD's Poisson sampling draws one now and then at a small site, and it must still go
        through every layer (a noise-only step, with per-sample gradients of length 0)."""
        net = self.net
        x = net.act(net.bn1(net.conv1(images)))
        if not net.no_max_pool:
            x = net.maxpool(x)
        x = net.layer4(net.layer3(net.layer2(net.layer1(x))))
        return torch.flatten(net.avgpool(x), 1)


class _DenseNetEncoder(nn.Module):
    def __init__(self, n_views: int):
        from monai.networks.nets import DenseNet121

        super().__init__()
        net = DenseNet121(spatial_dims=2, in_channels=n_views, out_channels=1, pretrained=False,
                          act=NO_INPLACE_RELU, norm=("group", {"num_groups": GROUPS}))
        self.out_features = net.class_layers.out.in_features
        net.class_layers.out = nn.Identity()  # the encoder ends at the pooled features
        self.net = group_norm_everywhere(net)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def resnet18_encoder(n_views: int) -> nn.Module:
    return _ResNetEncoder([2, 2, 2, 2], n_views)


def resnet34_encoder(n_views: int) -> nn.Module:
    return _ResNetEncoder([3, 4, 6, 3], n_views)


def densenet121_encoder(n_views: int) -> nn.Module:
    return _DenseNetEncoder(n_views)


# Image encoders (images -> `out_features` per patient), by registry name.
ENCODERS: dict[str, Callable[[int], nn.Module]] = {
    "densenet121": densenet121_encoder,
    "resnet18": resnet18_encoder,
    "resnet34": resnet34_encoder,
}


class ImageModel(nn.Module):
    """A MONAI encoder over the task's views -> one logit (clinical predictors are not read)."""

    def __init__(self, network: str, n_views: int, n_features: int, dropout: float = 0.2):
        super().__init__()
        if not n_views:
            raise ValueError(f"{network} reads images, but the task has no [image] table; "
                             "choose 'logistic' or 'mlp' for a table")
        if n_features:
            raise ValueError(f"{network} reads images only, but the task has {n_features} predictor input(s); "
                             f"choose 'fusion' with encoder = \"{network}\" to use both")
        self.encoder = ENCODERS[network](n_views)
        self.head = logit_head(self.encoder.out_features, dropout)

    def forward(self, images: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(images)).squeeze(1)
