"""diffusers models <-> condiff models: the registry of the per-class format modules, the object-level
entry points (`from_diffusers` / `to_diffusers`, diffusers needed) and the reader of a diffusers model directory.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from torch import Tensor, nn

from condiff.interop import diffusers_dit, diffusers_pixart, diffusers_sd3, diffusers_unet
from condiff.models import family_of


FROM_DIFFUSERS: dict[str, Callable] = {
    "DiTTransformer2DModel": diffusers_dit.to_condiff,
    "SD3Transformer2DModel": diffusers_sd3.to_condiff,
    "PixArtTransformer2DModel": diffusers_pixart.to_condiff,
    "UNet2DConditionModel": diffusers_unet.to_condiff,
}
TO_DIFFUSERS: dict[str, Callable] = {  # condiff family -> converter
    "dit": diffusers_dit.from_condiff,
    "mmdit": diffusers_sd3.from_condiff,
    "pixart-alpha": diffusers_pixart.from_condiff,
    "unet-sdxl": diffusers_unet.from_condiff,
}


def diffusers_to_condiff(class_name: str, config: dict, state_dict: dict[str, Tensor]
                         ) -> tuple[str, str, dict, dict[str, Tensor]]:
    """(diffusers class name, its config dict, its state dict) -> (condiff name, conditioning, create() kwargs,
    condiff state dict). Needs no diffusers install."""
    if class_name not in FROM_DIFFUSERS:
        raise ValueError(f"diffusers class {class_name!r} is not supported; supported: {sorted(FROM_DIFFUSERS)}")
    return FROM_DIFFUSERS[class_name](dict(config), state_dict)


def condiff_to_diffusers(model: nn.Module) -> tuple[str, dict, dict[str, Tensor]]:
    """A condiff model -> (diffusers class name, config dict, state dict)."""
    family = family_of(model.config["name"])
    if family not in TO_DIFFUSERS:
        raise ValueError(f"condiff family {family!r} has no diffusers counterpart; convertible: {sorted(TO_DIFFUSERS)}")
    return TO_DIFFUSERS[family](model)


def from_diffusers(model) -> nn.Module:
    """A diffusers transformer model object -> the equivalent condiff model (eval mode)."""
    from condiff.models import create

    name, conditioning, kwargs, sd = diffusers_to_condiff(type(model).__name__, dict(model.config), model.state_dict())
    ours = create(name, conditioning, **kwargs)
    ours.load_state_dict(sd)
    return ours.eval()


def to_diffusers(model: nn.Module):
    """A condiff model -> the equivalent diffusers model object (eval mode; needs diffusers)."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - diffusers is a test dependency
        raise ImportError("to_diffusers needs the diffusers package (pip install diffusers)") from e
    class_name, cfg, sd = condiff_to_diffusers(model)
    theirs = getattr(diffusers, class_name)(**cfg)
    theirs.load_state_dict(sd)
    return theirs.eval()


def read_diffusers_dir(path: str | Path) -> tuple[str, dict, dict[str, Tensor]]:
    """A diffusers model directory (config.json + *.safetensors, sharded or not) -> (class name, config, state)."""
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a diffusers model directory, e.g. the "
                                f"'transformer' folder of a pipeline)")
    config = json.loads(cfg_file.read_text())
    if "_class_name" not in config:
        raise ValueError(f"{cfg_file}: no '_class_name' field; not a diffusers model config")
    index = sorted(path.glob("*.safetensors.index.json"))
    if index:  # sharded: the files the (first, i.e. non-variant) index names
        files = sorted({path / f for f in json.loads(index[0].read_text())["weight_map"].values()})
    elif (path / "diffusion_pytorch_model.safetensors").is_file():  # not a variant such as *.fp16.safetensors
        files = [path / "diffusion_pytorch_model.safetensors"]
    else:
        files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (.bin weights are not read: convert them to "
                                "safetensors first)")
    state = {}
    for f in files:
        state.update(load_file(f))
    return config.pop("_class_name"), {k: v for k, v in config.items() if not k.startswith("_")}, state
