"""Typed training configuration: plain dataclasses (edm2 style), YAML recipes and `key=value` overrides.

A recipe is a YAML file whose nested mappings mirror `TrainConfig` below. Two extras:
  * `base: other.yaml` (path relative to the file) merges the recipe over another one (recursively;
    the 512 fine-tunes and the transfers are a few lines over their 256 recipes);
  * command-line overrides `section.key=value`, the value parsed as YAML (`optim.betas=[0.9,0.95]`).
Every key is checked: an unknown key, or a value of the wrong type, raises `ConfigError` naming the
full dotted key and what was expected. The `model` section is checked against its family's config
(`check_model`): a wrong `model.kwargs` key, type or width fails when the recipe loads, naming the file. The resolved config (`to_dict`) is saved with every run
(`run_dir/config.yaml`) and in every checkpoint's meta.json.

Paper defaults (App. C "Training", "Influence of momentum", "Scaling the training"):
  * Adam, constant learning rate; 256 px: batch 2,048, lr 1e-3 ("10 x 10^-4"), doubling lr again diverged;
    512 px: batch 384. betas (0.9, 0.999) are the PyTorch defaults the paper starts from; its grid
    search (Fig. A2, UNet, 70k steps) found beta2 = 0.95 better by 4.78 FID, so our recipes use
    betas [0.9, 0.95]. `optim.betas=[0.9,0.999]` restores the default.
  * Batch/LR coupling (Tab. A2): FID improved with larger batch AND larger lr in every setting until
    the run diverged. `optim.lr` is the lr AT `optim.ref_batch` images per step; when the global
    batch differs, `optim.lr_scaling` rescales it by gamma = batch / ref_batch: "sqrt" (lr * sqrt(gamma)),
    "linear" (lr * gamma) or "none". The recipes pin ref_batch to their own batch, so nothing changes
    unless you change the batch (e.g. fewer GPUs).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from condiff.conditioning.cond import CONTROL_GROUPS
from condiff.data.buckets import resolve_buckets
from condiff.diffusion.schedule import WEIGHTINGS


MINILM_WIDTH = 384  # sentence-transformers/all-MiniLM-L6-v2 (the default text encoder): states and pooled


class ConfigError(ValueError):
    """A recipe or an override is invalid; the message names the dotted key."""


@dataclass
class ModelConfig:
    name: str = "mmdit-ours-tiny"  # a zoo name understood by condiff.models.create
    conditioning: str = "class"  # "class" | "text"
    kwargs: dict = field(default_factory=dict)  # extra keyword overrides for create() (e.g. num_classes)


@dataclass
class DataConfig:
    shards: str = ""  # webdataset shards: path / glob / brace pattern / directory (`condiff make-shards`)
    resolution: int = 256  # training image size in pixels (square; ignored for latent shards); with buckets, the
    # pixel budget is resolution^2
    # aspect buckets (condiff.data.buckets): "" = square crops | sdxl (SDXL's list scaled to resolution) | auto |
    # auto:MAX_ASPECT | "HxW,HxW,..."; sides must be multiples of the model's patch x the autoencoder factor
    buckets: str = ""
    crop: str = "global"  # "global" (0.9-1) | "local" (0.4-0.6) | "mix" (0.4-1) | "center": crop-size ratio (Fig. 8c)
    flip: bool = True  # flip AUGMENTATION: random horizontal flips (recorded in phi_h; conditioned only if in control_fields)
    # control fields the model is CONDITIONED on (Table 2c rows): any of crop, aspect, flip, size
    # (condiff.conditioning.cond.CONTROL_GROUPS); the others are zeroed inside the model. Passed to the model
    # as `control_fields` (so sampling zeroes the same ones); ignored by models with control "none".
    control_fields: list = field(default_factory=lambda: ["crop", "aspect", "flip", "size"])
    num_classes: int = 0  # class-conditional data: number of classes; 0 = read dataset.json beside the shards
    label_drop: float = 0.1  # probability of the null class / empty caption (classifier-free guidance)
    control_drop: float = 0.1  # probability of dropping the control condition (control guidance, Eq. 2)
    workers: int = 2  # data-loader worker processes per rank (0 = in the main process)
    shuffle_buffer: int = 1000  # samples in each worker's shuffle buffer


@dataclass
class TextConfig:
    encoder: dict = field(default_factory=dict)  # condiff.conditioning.text.build_text_encoder(config); {} = class-cond
    cache: int = 0  # keep the encodings of up to this many distinct captions (small caption vocabularies)


@dataclass
class AutoencoderConfig:
    config: dict = field(default_factory=lambda: {"kind": "pixels"})  # condiff.data.autoencoder config
    # {"kind": "pixels"}: pixel-space diffusion; {"kind": "diffusers", "path": DIR}: a local SD-VAE


@dataclass
class ScheduleConfig:
    kwargs: dict = field(default_factory=dict)  # condiff.diffusion.Schedule keyword arguments
    # diffusion_loss weighting (Schedule.weight_table): "edm" (App. C: 1/sigma_t^2 on the denoiser error =
    # plain epsilon MSE) | "eps-inv-snr" (1/sigma_t^2 on the epsilon MSE; the former default) | "min-snr-gamma"
    weighting: str = "edm"
    snr_gamma: float = 5.0  # gamma of "min-snr-gamma"


@dataclass
class OptimConfig:
    name: str = "adam"  # "adam" | "adamw"
    lr: float = 1e-3  # learning rate at ref_batch images per step (constant after warm-up)
    ref_batch: int = 2048  # batch size at which `lr` was tuned (paper: 2,048 at 256 px)
    lr_scaling: str = "none"  # "none" | "sqrt" | "linear": rescale lr by batch / ref_batch (App. C)
    betas: list = field(default_factory=lambda: [0.9, 0.95])  # paper's best (Fig. A2); PyTorch default [0.9, 0.999]
    eps: float = 1e-8
    weight_decay: float = 0.0
    warmup_steps: int = 0  # linear warm-up from 0 to lr over this many steps
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup: int = 10  # effective decay min(decay, (1 + step) / (warmup + step)); 0 = no warm-up
    start_step: int = 0  # EMA copies the weights until this step
    kind: str = "exp"  # "exp" (decay above) | "power" (EDM2 power profiles) | "both": condiff.train.phema
    sigma_rels: list = field(default_factory=lambda: [0.05, 0.10])  # power profiles' lengths (EDM2 Sec. 3.1)
    snapshot_every: int = 0  # steps between power-profile snapshots in run_dir/phema/ (0 = none)


@dataclass
class LogConfig:
    every: int = 50  # steps between JSONL metric records
    tensorboard: bool = False
    progress: bool = True  # tqdm progress bar on rank 0
    sample_every: int = 0  # steps between EMA sample grids (0: only at the end)
    sample_prompts: list = field(default_factory=list)  # text-cond grid prompts
    sample_labels: list = field(default_factory=list)  # class-cond grid labels
    sample_steps: int = 25  # DDIM steps for grids
    sample_guidance: float = 3.0  # lambda of Eq. 2 for grids, at the model's base resolution (Eq. 4 elsewhere),
    # exactly as `condiff sample --guidance`
    sample_size_cond: str = "auto"  # size conditioning of grids, `condiff sample --size-cond` syntax (Table 2b):
    # auto | train-dist | output | fixed:H[xW] | uniform:LO-HI
    sample_per_prompt: int = 4  # images per prompt / label in a grid


@dataclass
class TransferConfig:
    strict_shapes: bool = False  # refuse to start if any source weight cannot be loaded
    rescale_schedule: bool = True  # Eq. 3 when the resolution changes
    keep_base_size: bool = True  # App. C: keep the source model's positional-grid base size
    use_ema: bool = True  # initialise from the source's EMA weights (else its raw weights)


@dataclass
class TrainConfig:
    run_dir: str = "runs/default"
    seed: int = 0
    steps: int = 1000  # total optimizer steps (resume continues up to this)
    batch_size: int = 64  # GLOBAL images per step (split evenly across ranks)
    grad_accum: int = 1  # micro-batches per step on each rank
    save_every: int = 1000
    keep_last: int = 3  # complete checkpoints kept (0 keeps all)
    precision: str = "fp32"  # "fp32" | "bf16" (autocast; weights and optimizer stay fp32)
    parallel: str = "auto"  # "auto" (ddp if world > 1) | "none" | "ddp" | "fsdp"
    compile: bool = False  # torch.compile the model
    activation_checkpointing: bool = False  # recompute each block's activations in the backward pass
    max_nonfinite: int = 20  # stop after this many consecutive non-finite steps
    init_from: str = ""  # checkpoint (or run dir) to initialise from (condiff.train.transfer; its schedule, rescaled)
    resume: bool = True  # continue from run_dir's newest checkpoint that verifies (io.checkpoint.verify_checkpoint)
    resume_partial: bool = False  # no checkpoint verifies: resume anyway from the newest one missing optim/rng/EMA files
    overwrite: bool = False  # resume=false on a run_dir holding checkpoints: delete them (else an error)
    device: str = "auto"  # "auto" (cuda:LOCAL_RANK if available, else cpu) | "cpu" | "cuda"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    text: TextConfig = field(default_factory=TextConfig)
    autoencoder: AutoencoderConfig = field(default_factory=AutoencoderConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    log: LogConfig = field(default_factory=LogConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)

    def validate(self) -> "TrainConfig":
        def check(ok: bool, key: str, expected: str) -> None:
            if not ok:
                raise ConfigError(f"{key}: expected {expected}, got {_get(self, key)!r}")

        check(self.steps >= 0, "steps", "a non-negative integer")
        check(self.batch_size > 0, "batch_size", "a positive integer")
        check(self.grad_accum > 0, "grad_accum", "a positive integer")
        check(self.batch_size % self.grad_accum == 0, "grad_accum", f"a divisor of batch_size={self.batch_size}")
        check(self.save_every > 0, "save_every", "a positive integer")
        check(self.keep_last >= 0, "keep_last", "a non-negative integer (0 keeps all)")
        check(self.precision in ("fp32", "bf16"), "precision", "'fp32' or 'bf16'")
        check(self.parallel in ("auto", "none", "ddp", "fsdp"), "parallel", "one of auto/none/ddp/fsdp")
        check(self.device in ("auto", "cpu", "cuda"), "device", "one of auto/cpu/cuda")
        check(self.max_nonfinite > 0, "max_nonfinite", "a positive integer")
        check(self.model.conditioning in ("class", "text"), "model.conditioning", "'class' or 'text'")
        check(self.data.crop in ("global", "local", "mix", "center"), "data.crop", "one of global/local/mix/center")
        check(not [f for f in self.data.control_fields if f not in CONTROL_GROUPS]
              and len(set(self.data.control_fields)) == len(self.data.control_fields),
              "data.control_fields", f"distinct names from {list(CONTROL_GROUPS)}")
        mk = self.model.kwargs.get("control_fields")
        if mk is not None and list(mk) != list(self.data.control_fields):
            raise ConfigError(f"model.kwargs.control_fields {list(mk)} != data.control_fields "
                              f"{list(self.data.control_fields)}: set data.control_fields only")
        check(self.data.resolution > 0, "data.resolution", "a positive integer")
        try:
            resolve_buckets(self.data.buckets, self.data.resolution)  # the side multiple is checked by the trainer
        except ValueError as e:
            raise ConfigError(str(e)) from None
        check(self.data.workers >= 0, "data.workers", "a non-negative integer (0 = in the main process)")
        check(self.data.shuffle_buffer >= 0, "data.shuffle_buffer", "a non-negative integer (0 or 1 = no shuffling)")
        check(0 <= self.data.label_drop < 1, "data.label_drop", "a probability in [0, 1)")
        check(0 <= self.data.control_drop <= 1, "data.control_drop", "a probability in [0, 1]")
        check(self.schedule.weighting in WEIGHTINGS, "schedule.weighting",
              f"one of {'/'.join(WEIGHTINGS)} ('inv-snr' is now 'eps-inv-snr'; the EDM reading is 'edm')")
        check(self.schedule.snr_gamma > 0, "schedule.snr_gamma", "a positive float")
        check(self.optim.name in ("adam", "adamw"), "optim.name", "'adam' or 'adamw'")
        check(math.isfinite(self.optim.lr) and self.optim.lr > 0, "optim.lr", "a positive finite float")
        check(math.isfinite(self.optim.eps) and self.optim.eps > 0, "optim.eps",
              "a positive finite float (Adam divides by sqrt(v) + eps)")
        check(self.optim.lr_scaling in ("none", "sqrt", "linear"), "optim.lr_scaling", "one of none/sqrt/linear")
        check(len(self.optim.betas) == 2 and all(isinstance(b, (int, float)) and 0 <= b < 1 for b in self.optim.betas),
              "optim.betas", "two floats in [0, 1)")
        check(self.optim.grad_clip >= 0, "optim.grad_clip", "a non-negative float (0 disables)")
        check(0 <= self.ema.decay < 1, "ema.decay", "a float in [0, 1)")
        check(self.ema.warmup >= 0, "ema.warmup", "a non-negative integer (0 = no warm-up)")
        check(self.ema.start_step >= 0, "ema.start_step", "a non-negative integer")
        check(self.ema.kind in ("exp", "power", "both"), "ema.kind", "one of exp/power/both")
        check(len(self.ema.sigma_rels) > 0 and all(isinstance(s, (int, float)) and 0 < s < 0.2886
                                                    for s in self.ema.sigma_rels),
              "ema.sigma_rels", "a non-empty list of floats in (0, 0.2886)")
        check(self.ema.snapshot_every >= 0, "ema.snapshot_every", "a non-negative integer (0 = no snapshots)")
        check(self.log.every > 0, "log.every", "a positive integer")
        check(math.isfinite(self.log.sample_guidance) and self.log.sample_guidance >= 0, "log.sample_guidance",
              "a finite float >= 0")
        if self.model.conditioning == "text" and not self.text.encoder:
            raise ConfigError("text.encoder: a text-conditioned model (model.conditioning=text) needs a text encoder config")
        return self

    def effective_lr(self) -> float:
        """optim.lr rescaled for batch_size by the App. C rule chosen in optim.lr_scaling."""
        gamma = self.batch_size / self.optim.ref_batch
        factor = {"none": 1.0, "sqrt": math.sqrt(gamma), "linear": gamma}[self.optim.lr_scaling]
        return self.optim.lr * factor

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _get(obj: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check `value` against the annotation `tp`; ints are accepted for floats. Raises ConfigError."""
    origin = typing.get_origin(tp) or tp
    if origin is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if origin is float and isinstance(value, str) and _looks_float(value):  # YAML 1.1 reads 1e-4 as a string
        return float(value)
    if origin is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if origin is bool and isinstance(value, bool):
        return value
    if origin is str and isinstance(value, str):
        return value
    if origin is list and isinstance(value, (list, tuple)):
        return _fix_yaml_floats(list(value))
    if origin is dict and isinstance(value, dict):
        return _fix_yaml_floats(dict(value))
    raise ConfigError(f"{key}: expected {_type_name(origin)}, got {type(value).__name__} {value!r}")


def _apply(obj: Any, data: dict, prefix: str = "") -> None:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or '<root>'}: expected a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in names:
            raise ConfigError(f"unknown config key {dotted!r} (known in {prefix.rstrip('.') or 'the top level'}: "
                              f"{', '.join(sorted(names))})")
        tp = hints[key]
        if dataclasses.is_dataclass(tp):
            _apply(getattr(obj, key), value, dotted + ".")
        else:
            setattr(obj, key, _coerce(value, tp, dotted))


def _load_yaml(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: circular `base:` chain {' -> '.join(map(str, seen + (path,)))}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base: expected a path string, got {base!r}")
    return _merge(_load_yaml(path.parent / base, seen + (path,)), data, _OPAQUE)


def _merge(base: dict, over: dict, opaque: frozenset = frozenset()) -> dict:
    """Recursive dict merge; keys in `opaque` are replaced whole instead of merged."""
    out = dict(base)
    for k, v in over.items():
        deep = isinstance(v, dict) and isinstance(out.get(k), dict) and k not in opaque
        out[k] = _merge(out[k], v, opaque) if deep else v
    return out


# dict-valued fields that a recipe replaces whole when it overrides its `base:` (a different text
# encoder or autoencoder config must not inherit the base's keys). Command-line overrides always merge.
_OPAQUE = frozenset({"encoder", "config"})


def parse_override(item: str) -> tuple[str, Any]:
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=1e-4)")
    key, raw = item.split("=", 1)
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {key}: cannot parse value {raw!r} ({e})") from e
    return key.strip(), value


def _looks_float(raw: str) -> bool:
    try:
        float(raw)
        return True
    except ValueError:
        return False


def _nest(key: str, value: Any) -> dict:
    out: Any = value
    for part in reversed(key.split(".")):
        out = {part: out}
    return out


def _fix_yaml_floats(data: Any) -> Any:
    """PyYAML (YAML 1.1) reads `1e-4` as a string; turn such strings back into floats."""
    if isinstance(data, dict):
        return {k: _fix_yaml_floats(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_fix_yaml_floats(v) for v in data]
    if isinstance(data, str) and _looks_float(data) and "e" in data.lower() and "n" not in data.lower():
        return float(data)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = (), data: dict | None = None) -> TrainConfig:
    """Build a validated TrainConfig from a YAML recipe (or a dict) plus `key=value` overrides."""
    merged: dict = {}
    if path is not None:
        merged = _load_yaml(Path(path))
    if data is not None:
        merged = _merge(merged, data, _OPAQUE)
    for item in overrides:
        key, value = parse_override(item)
        merged = _merge(merged, _nest(key, value))
    cfg = TrainConfig()
    _apply(cfg, merged)
    cfg.validate()
    check_model(cfg, str(path) if path is not None else "<config data>")
    return cfg


def check_model(cfg: TrainConfig, source: str) -> None:
    """Validate the recipe's `model` section against its family's config (`condiff.models.model_config`): every
    `model.kwargs` key must be a field of that config with a value of its type, the resolved config must be
    valid, and the text widths / input channels must match the text encoder / autoencoder when the recipe
    states them. Raises ConfigError naming `source` (the recipe file) and the dotted key."""
    from condiff.models import family_of, model_config

    m = cfg.model
    try:
        family = family_of(m.name)
        base = model_config(m.name, m.conditioning)
    except ValueError as e:
        raise ConfigError(f"{source}: model.name: {e}") from None
    hints = typing.get_type_hints(type(base))
    for key, value in m.kwargs.items():
        if key not in hints or key in ("name", "conditioning"):
            raise ConfigError(f"{source}: model.kwargs.{key}: not an option of {family} models (known: "
                              f"{', '.join(sorted(set(hints) - {'name', 'conditioning'}))})")
        _check_type(value, hints[key], f"{source}: model.kwargs.{key}")
    kwargs = dict(m.kwargs)
    if m.conditioning == "class" and cfg.data.num_classes:
        kwargs.setdefault("num_classes", cfg.data.num_classes)
    try:
        resolved = model_config(m.name, m.conditioning, **kwargs)
    except ValueError as e:
        raise ConfigError(f"{source}: model.kwargs: {e}") from None
    widths = {}
    if m.conditioning == "text":
        width = _text_encoder_width(cfg.text.encoder)
        widths.update(text_dim=width, pooled_dim=width)
    widths["in_channels"] = _autoencoder_channels(cfg.autoencoder.config)
    if hasattr(resolved, "out_channels"):  # the UNet states its output channels separately
        widths["out_channels"] = widths["in_channels"]
    for key, expected in widths.items():  # the widths the recipe states (defaults are the paper's sizes)
        if key in m.kwargs and expected is not None and getattr(resolved, key) != expected:
            raise ConfigError(f"{source}: model.kwargs.{key}: the model is {getattr(resolved, key)} wide but the "
                              f"{'text encoder' if key.endswith('_dim') else 'autoencoder'} gives {expected}; "
                              f"set model.kwargs.{key}: {expected}")


def _check_type(value: Any, tp: Any, key: str) -> None:
    """ConfigError unless `value` fits the annotation `tp` (`X | None` accepts None)."""
    options = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    if value is None and type(None) in options:
        return
    errors = []
    for option in (o for o in options if o is not type(None)):
        try:
            _coerce(value, option, key)
            return
        except ConfigError as e:
            errors.append(e)
    raise errors[0]


def _json_field(path: str | None, *keys: str) -> int | None:
    """An int field of `path/config.json` (first of `keys` found, dotted for nesting), None if unreadable."""
    if not path:
        return None
    try:
        data = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    for key in keys:
        node = data
        for part in key.split("."):
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, int):
            return node
    return None


def _text_encoder_width(encoder: dict) -> int | None:
    """Width of the states and pooled vector of a text-encoder config, when knowable without loading it."""
    kind = encoder.get("kind")
    if kind == "tiny-clip":
        return int(encoder.get("dim", 64))
    if kind == "minilm" and not encoder.get("path"):
        return MINILM_WIDTH
    if kind in ("clip", "minilm"):
        return _json_field(encoder.get("path"), "hidden_size", "text_config.hidden_size")
    return None


def _autoencoder_channels(config: dict) -> int | None:
    """Channels the model sees: 3 in pixel space, the VAE's latent channels when its config.json is readable."""
    if config.get("kind", "pixels") == "pixels":
        return 3
    return _json_field(config.get("path"), "latent_channels")


def dump_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
