"""Configuration of each component, read from the model's own Hugging Face ``config.json``.

``from_dict`` is the only place that knows the diffusers/transformers spellings. Defaults are the
Stable Diffusion 2.1-base values. A config value that changes the math and is not implemented
raises ``ValueError`` rather than being ignored.
"""

from dataclasses import dataclass, fields
from typing import Optional, Tuple


def _as_tuple(value, n: int) -> tuple:
    """Broadcast an int (or a length-1 list) to ``n`` entries, the way diffusers does."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"expected {n} values per block, got {list(value)}")
        return tuple(value)
    return (value,) * n


def _object(config, what: str) -> dict:
    if not isinstance(config, dict):
        raise ValueError(f"{what}: expected a JSON object, got a {type(config).__name__}")
    return config


def _key(config: dict, key: str, what: str):
    if key not in config:
        raise ValueError(f"{what}: missing key {key!r}")
    return config[key]


def _positive_int(value, key: str, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}: {key}={value!r} must be a whole number >= 1")
    return value


def _positive_ints(value, key: str, what: str) -> tuple:
    """A non-empty list of whole numbers >= 1 (or one such number, for per-block settings)."""
    values = value if isinstance(value, (list, tuple)) else [value]
    if not values or any(isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in values):
        raise ValueError(f"{what}: {key}={value!r} must be whole numbers >= 1")
    return value


def _strings(value, key: str, what: str) -> tuple:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise ValueError(f"{what}: {key}={value!r} must be a list of block type names")
    return tuple(value)


def _number(config: dict, key: str, default, what: str) -> float:
    value = config.get(key, default)
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
        raise ValueError(f"{what}: {key}={value!r} must be a number")
    return value


def _require(config: dict, key: str, allowed, what: str):
    value = config.get(key, allowed[0])
    if value not in allowed:
        raise ValueError(f"{what}: {key}={value!r} is not supported (supported: {list(allowed)})")


@dataclass
class CLIPTextModelConfig:
    num_layers: int = 23
    model_dims: int = 1024
    num_heads: int = 16
    max_length: int = 77
    vocab_size: int = 49408
    intermediate_size: int = 4096
    hidden_act: str = "gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407
    # Set for CLIPTextModelWithProjection (SDXL's second encoder): the pooled output is projected.
    projection_dim: Optional[int] = None

    @classmethod
    def from_dict(cls, config: dict) -> "CLIPTextModelConfig":
        what = "text encoder"
        _object(config, what)
        for key in ("num_hidden_layers", "hidden_size", "num_attention_heads", "vocab_size", "intermediate_size"):
            _positive_int(_key(config, key, what), key, what)
        if config["hidden_size"] % config["num_attention_heads"]:
            raise ValueError(f"{what}: num_attention_heads={config['num_attention_heads']} does not divide hidden_size={config['hidden_size']}")
        _positive_int(config.get("max_position_embeddings", 77), "max_position_embeddings", what)
        archs = config.get("architectures") or ["CLIPTextModel"]
        with_projection = "CLIPTextModelWithProjection" in archs
        if config.get("hidden_act", "quick_gelu") not in ("gelu", "quick_gelu"):
            raise ValueError(f"text encoder: hidden_act={config['hidden_act']!r} is not supported")
        return cls(
            num_layers=config["num_hidden_layers"],
            model_dims=config["hidden_size"],
            num_heads=config["num_attention_heads"],
            max_length=config.get("max_position_embeddings", 77),
            vocab_size=config["vocab_size"],
            intermediate_size=config["intermediate_size"],
            hidden_act=config.get("hidden_act", "quick_gelu"),
            layer_norm_eps=config.get("layer_norm_eps", 1e-5),
            eos_token_id=config.get("eos_token_id", 49407),
            projection_dim=config.get("projection_dim") if with_projection else None,
        )


@dataclass
class UNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    block_out_channels: Tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: Tuple[int, ...] = (2, 2, 2, 2)
    mid_block_layers: int = 1
    transformer_layers_per_block: Tuple[int, ...] = (1, 1, 1, 1)
    # Up blocks read transformer depths in reverse unless the config gives them explicitly.
    reverse_transformer_layers_per_block: Optional[Tuple[int, ...]] = None
    num_attention_heads: Tuple[int, ...] = (5, 10, 20, 20)
    cross_attention_dim: Tuple[int, ...] = (1024, 1024, 1024, 1024)
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    down_block_types: Tuple[str, ...] = (
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    )
    up_block_types: Tuple[str, ...] = (
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    )
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    downsample_padding: int = 1
    use_linear_projection: bool = True
    upcast_attention: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    # SDXL: "text_time" adds an embedding of the pooled text and the size/crop time ids.
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    projection_class_embeddings_input_dim: Optional[int] = None

    @classmethod
    def from_dict(cls, config: dict) -> "UNetConfig":
        what = "unet"
        _object(config, what)
        for key, allowed in [
            ("act_fn", ("silu",)),
            ("resnet_time_scale_shift", ("default",)),
            ("time_embedding_type", ("positional",)),
            ("class_embed_type", (None,)),
            ("encoder_hid_dim_type", (None,)),
            ("addition_embed_type", (None, "text_time")),
            ("dual_cross_attention", (False,)),
            ("only_cross_attention", (False,)),
            ("center_input_sample", (False,)),
            ("attention_type", ("default",)),
            ("mid_block_type", ("UNetMidBlock2DCrossAttn", None)),
            ("time_cond_proj_dim", (None,)),
            ("resnet_skip_time_act", (False,)),
            ("resnet_out_scale_factor", (1.0,)),
            ("mid_block_scale_factor", (1,)),
            ("cross_attention_norm", (None,)),
            ("time_embedding_dim", (None,)),
            ("timestep_post_act", (None,)),
            ("time_embedding_act_fn", (None,)),
            ("num_class_embeds", (None,)),
            ("encoder_hid_dim", (None,)),
            ("mid_block_only_cross_attention", (None, False)),
        ]:
            _require(config, key, allowed, what)
        channels = _positive_ints(_key(config, "block_out_channels", what), "block_out_channels", what)
        if not isinstance(channels, (list, tuple)):
            raise ValueError(f"{what}: block_out_channels={channels!r} must be a list")
        n = len(channels)
        for key in ("down_block_types", "up_block_types"):
            if len(_strings(_key(config, key, what), key, what)) != n:
                raise ValueError(f"{what}: {key} has {len(config[key])} entries but block_out_channels has {n}")
        for t in config["down_block_types"]:
            if t not in ("CrossAttnDownBlock2D", "DownBlock2D"):
                raise ValueError(f"unet: down block type {t!r} is not supported")
        for t in config["up_block_types"]:
            if t not in ("CrossAttnUpBlock2D", "UpBlock2D"):
                raise ValueError(f"unet: up block type {t!r} is not supported")
        for key, default in (("in_channels", 4), ("out_channels", 4), ("norm_num_groups", 32), ("conv_in_kernel", 3), ("conv_out_kernel", 3)):
            _positive_int(config.get(key, default), key, what)
        for key, default in (("layers_per_block", 2), ("cross_attention_dim", 1280)):
            _positive_ints(config.get(key, default), key, what)
        _number(config, "norm_eps", 1e-5, what)
        sample_size = config.get("sample_size", 64)
        if isinstance(sample_size, (list, tuple)) and len(sample_size) == 2:
            _positive_ints(sample_size, "sample_size", what)
        else:
            _positive_int(sample_size, "sample_size", what)

        # diffusers' historical naming: when num_attention_heads is absent, attention_head_dim
        # holds the number of heads (SD 1: 8, SD 2: [5, 10, 20, 20]).
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        heads_key = "num_attention_heads" if config.get("num_attention_heads") else "attention_head_dim"
        attends = [t.startswith("CrossAttn") for t in config["down_block_types"]]
        attends[-1] = attends[-1] or config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
        for c, h, a in zip(channels, _as_tuple(_positive_ints(heads, heads_key, what), n), attends):
            if a and c % h:
                raise ValueError(f"{what}: {heads_key}={heads!r} does not divide block_out_channels={list(channels)} ({h} heads for {c} channels)")
        groups = config.get("norm_num_groups", 32)
        if any(c % groups for c in channels):
            raise ValueError(f"{what}: norm_num_groups={groups} does not divide block_out_channels={list(channels)}")
        reverse = config.get("reverse_transformer_layers_per_block")
        if reverse is not None:
            if any(isinstance(r, (list, tuple)) and len(set(r)) != 1 for r in reverse):
                raise ValueError("unet: per-layer reverse_transformer_layers_per_block is not supported")
            reverse = tuple(r[0] if isinstance(r, (list, tuple)) else r for r in reverse)
        return cls(
            in_channels=config.get("in_channels", 4),
            out_channels=config.get("out_channels", 4),
            conv_in_kernel=config.get("conv_in_kernel", 3),
            conv_out_kernel=config.get("conv_out_kernel", 3),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=_as_tuple(config.get("layers_per_block", 2), n),
            transformer_layers_per_block=_as_tuple(config.get("transformer_layers_per_block", 1), n),
            reverse_transformer_layers_per_block=reverse,
            num_attention_heads=_as_tuple(heads, n),
            cross_attention_dim=_as_tuple(config.get("cross_attention_dim", 1280), n),
            norm_num_groups=config.get("norm_num_groups", 32),
            norm_eps=config.get("norm_eps", 1e-5),
            down_block_types=tuple(config["down_block_types"]),
            up_block_types=tuple(config["up_block_types"]),
            mid_block_type=config.get("mid_block_type", "UNetMidBlock2DCrossAttn"),
            downsample_padding=config.get("downsample_padding", 1),
            use_linear_projection=config.get("use_linear_projection", False),
            upcast_attention=config.get("upcast_attention", False) or False,
            flip_sin_to_cos=config.get("flip_sin_to_cos", True),
            freq_shift=config.get("freq_shift", 0),
            addition_embed_type=config.get("addition_embed_type"),
            addition_time_embed_dim=config.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=config.get("projection_class_embeddings_input_dim"),
        )


@dataclass
class AutoencoderConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: Tuple[int, ...] = (128, 256, 512, 512)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    shift_factor: Optional[float] = None
    # SDXL's VAE overflows in float16: diffusers decodes it in float32 when this is set.
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True
    # The tile of diffusers' enable_tiling() (tile_sample_min_size), in pixels; AutoencoderKL's default.
    sample_size: int = 32

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_dict(cls, config: dict) -> "AutoencoderConfig":
        what = "vae"
        _object(config, what)
        channels = _positive_ints(_key(config, "block_out_channels", what), "block_out_channels", what)
        if not isinstance(channels, (list, tuple)):
            raise ValueError(f"{what}: block_out_channels={channels!r} must be a list")
        for key, default in (("in_channels", 3), ("out_channels", 3), ("latent_channels", 4), ("layers_per_block", 2), ("norm_num_groups", 32)):
            _positive_int(config.get(key, default), key, what)
        groups = config.get("norm_num_groups", 32)
        if any(c % groups for c in channels):
            raise ValueError(f"{what}: norm_num_groups={groups} does not divide block_out_channels={list(channels)}")
        if _number(config, "scaling_factor", 0.18215, what) == 0:
            raise ValueError(f"{what}: scaling_factor=0 is not a usable latent scale")
        if config.get("shift_factor") is not None:
            _number(config, "shift_factor", 0.0, what)
        _require(config, "act_fn", ("silu",), "vae")
        for t in config.get("down_block_types", ()):
            if t != "DownEncoderBlock2D":
                raise ValueError(f"vae: down block type {t!r} is not supported")
        for t in config.get("up_block_types", ()):
            if t != "UpDecoderBlock2D":
                raise ValueError(f"vae: up block type {t!r} is not supported")
        if config.get("latents_mean") is not None:
            raise ValueError("vae: latents_mean/latents_std normalisation is not supported")
        sample_size = config.get("sample_size", 32)
        if isinstance(sample_size, (list, tuple)) and len(sample_size) == 2:  # diffusers tiles by the first
            sample_size = sample_size[0]
        _positive_int(sample_size, "sample_size", what)
        return cls(
            in_channels=config.get("in_channels", 3),
            out_channels=config.get("out_channels", 3),
            latent_channels=config.get("latent_channels", 4),
            block_out_channels=tuple(config["block_out_channels"]),
            layers_per_block=config.get("layers_per_block", 2),
            norm_num_groups=config.get("norm_num_groups", 32),
            scaling_factor=config.get("scaling_factor", 0.18215),
            shift_factor=config.get("shift_factor"),
            force_upcast=config.get("force_upcast", True),
            use_quant_conv=config.get("use_quant_conv", True),
            use_post_quant_conv=config.get("use_post_quant_conv", True),
            mid_block_add_attention=config.get("mid_block_add_attention", True),
            sample_size=sample_size,
        )


# The diffusers schedulers we implement, and what each supports beyond the common settings
# ("schedules": the use_karras_sigmas / use_exponential_sigmas / use_beta_sigmas flags).
_ALL_PREDICTIONS = ("epsilon", "v_prediction", "sample")
SCHEDULER_CLASSES = {
    "EulerDiscreteScheduler": {"predictions": _ALL_PREDICTIONS, "schedules": True},
    # diffusers' Euler ancestral has no schedule flags; ours takes them with Euler's formulas.
    "EulerAncestralDiscreteScheduler": {"predictions": ("epsilon", "v_prediction"), "schedules": True},
    "DDIMScheduler": {"predictions": _ALL_PREDICTIONS, "schedules": False},
    "DPMSolverMultistepScheduler": {"predictions": _ALL_PREDICTIONS, "schedules": True},
    "PNDMScheduler": {"predictions": ("epsilon", "v_prediction"), "schedules": False},
    "LMSDiscreteScheduler": {"predictions": _ALL_PREDICTIONS, "schedules": True},
    "HeunDiscreteScheduler": {"predictions": _ALL_PREDICTIONS, "schedules": True},
    "KDPM2DiscreteScheduler": {"predictions": ("epsilon", "v_prediction"), "schedules": True},
    "KDPM2AncestralDiscreteScheduler": {"predictions": ("epsilon", "v_prediction"), "schedules": True},
    "LCMScheduler": {"predictions": _ALL_PREDICTIONS, "schedules": False},
    "DPMSolverSDEScheduler": {"predictions": ("epsilon", "v_prediction"), "schedules": True},
    "UniPCMultistepScheduler": {"predictions": _ALL_PREDICTIONS, "schedules": True},
    "DEISMultistepScheduler": {"predictions": _ALL_PREDICTIONS, "schedules": True},
}
SCHEDULE_FLAGS = ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")
# Where a class's __init__ default differs from the dataclass's (diffusers 0.42.1).
_K_DIFFUSION_BETAS = {"beta_start": 0.00085, "beta_end": 0.012}
_CLASS_DEFAULTS = {
    "DDIMScheduler": {"timestep_spacing": "leading"},
    "PNDMScheduler": {"timestep_spacing": "leading", "set_alpha_to_one": False},
    "HeunDiscreteScheduler": {**_K_DIFFUSION_BETAS, "clip_sample": False},
    "KDPM2DiscreteScheduler": _K_DIFFUSION_BETAS,
    "KDPM2AncestralDiscreteScheduler": _K_DIFFUSION_BETAS,
    "LCMScheduler": {**_K_DIFFUSION_BETAS, "beta_schedule": "scaled_linear", "timestep_spacing": "leading", "clip_sample": False},
    "DPMSolverSDEScheduler": _K_DIFFUSION_BETAS,
    "UniPCMultistepScheduler": {"solver_type": "bh2"},
    "DEISMultistepScheduler": {"algorithm_type": "deis", "solver_type": "logrho"},
}
SPACINGS = ("linspace", "leading", "trailing")


@dataclass
class SchedulerConfig:
    """One diffusers scheduler's settings; the defaults are diffusers' own (EulerDiscreteScheduler's)."""

    class_name: str = "EulerDiscreteScheduler"
    num_train_timesteps: int = 1000
    beta_start: float = 0.0001
    beta_end: float = 0.02
    beta_schedule: str = "linear"
    prediction_type: str = "epsilon"
    timestep_spacing: str = "linspace"
    steps_offset: int = 0
    rescale_betas_zero_snr: bool = False
    # The sigma-based samplers (at most one of the three)
    use_karras_sigmas: bool = False
    use_exponential_sigmas: bool = False
    use_beta_sigmas: bool = False
    # Euler and DPM-Solver
    final_sigmas_type: str = "zero"
    # Euler
    interpolation_type: str = "linear"
    # DDIM, PNDM, LCM (and Heun's clip_sample)
    set_alpha_to_one: bool = True
    clip_sample: bool = True
    clip_sample_range: float = 1.0
    # PNDM
    skip_prk_steps: bool = False
    # LCM
    original_inference_steps: int = 50
    timestep_scaling: float = 10.0
    # DPM-Solver
    solver_order: int = 2
    algorithm_type: str = "dpmsolver++"
    solver_type: str = "midpoint"
    lower_order_final: bool = True
    euler_at_final: bool = False
    # UniPC
    predict_x0: bool = True

    @classmethod
    def from_dict(cls, config: dict, class_name: Optional[str] = None) -> "SchedulerConfig":
        """What diffusers' ``Class.from_config(config)`` holds: the class's defaults, overridden by ``config``.

        ``class_name`` is the scheduler that will run (default: the config's own ``_class_name`` when
        implemented, else EulerDiscreteScheduler, which runs the configs of the others).
        Every setting that would change the math and is not implemented raises ValueError.
        """
        _object(config, "scheduler")
        own = config.get("_class_name")
        class_name = class_name or (own if own in SCHEDULER_CLASSES else cls.class_name)
        if config.get("trained_betas") is not None:
            raise ValueError("scheduler: trained_betas is not supported")
        for key in ("thresholding", "use_lu_lambdas", "use_flow_sigmas", "use_dynamic_shifting"):
            if config.get(key):
                raise ValueError(f"scheduler: {key}=True is not supported")
        for key in ("sigma_min", "sigma_max", "variance_type"):
            if config.get(key) is not None:
                raise ValueError(f"scheduler: {key}={config[key]!r} is not supported")
        if config.get("timestep_type", "discrete") != "discrete":
            raise ValueError(f"scheduler: timestep_type={config['timestep_type']!r} is not supported")
        if config.get("lambda_min_clipped", -float("inf")) != -float("inf"):
            raise ValueError(f"scheduler: lambda_min_clipped={config['lambda_min_clipped']!r} is not supported")

        settings = {f.name: f for f in fields(cls) if f.name != "class_name"}
        values = dict(_CLASS_DEFAULTS.get(class_name, {}))
        for key, value in config.items():
            if key in settings and value is not None:
                values[key] = _checked_type(f"scheduler: {key}", value, type(settings[key].default))
        self = cls(class_name=class_name, **values)
        self._check()
        return self

    def _check(self):
        what = f"scheduler ({self.class_name})"
        supported = SCHEDULER_CLASSES[self.class_name]
        choices = [
            ("beta_schedule", ("linear", "scaled_linear", "squaredcos_cap_v2")),
            ("prediction_type", supported["predictions"]),
            ("timestep_spacing", SPACINGS),
            ("final_sigmas_type", ("zero", "sigma_min")),
        ]
        if self.class_name == "EulerDiscreteScheduler":
            choices.append(("interpolation_type", ("linear",)))
        if self.class_name == "DPMSolverMultistepScheduler":
            choices += [("algorithm_type", ("dpmsolver++",)), ("solver_order", (2,)), ("solver_type", ("midpoint", "heun"))]
        if self.class_name == "UniPCMultistepScheduler":
            choices += [("solver_order", (1, 2)), ("solver_type", ("bh1", "bh2")), ("predict_x0", (True,))]
        if self.class_name == "DEISMultistepScheduler":
            choices += [("solver_order", (1, 2)), ("algorithm_type", ("deis",)), ("solver_type", ("logrho",))]
        for key, allowed in choices:
            if getattr(self, key) not in allowed:
                raise ValueError(f"{what}: {key}={getattr(self, key)!r} is not supported (supported: {list(allowed)})")
        flags = [flag for flag in SCHEDULE_FLAGS if getattr(self, flag)]
        if flags and not supported["schedules"]:
            raise ValueError(f"{what}: {flags[0]}=True is not supported (its diffusers class has no such schedule); use a sigma-based sampler such as 'euler'")
        if len(flags) > 1:
            raise ValueError(f"{what}: {' and '.join(flags)} are both set; set at most one of {', '.join(SCHEDULE_FLAGS)}")
        if self.num_train_timesteps < 1 or not 0 < self.beta_start <= self.beta_end < 1:
            raise ValueError(f"{what}: need num_train_timesteps >= 1 and 0 < beta_start <= beta_end < 1")


def _checked_type(what: str, value, kind: type):
    """``value`` as ``kind`` (an int is a float; a bool is not a number), or ValueError naming ``what``."""
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, kind) and (kind is bool or not isinstance(value, bool)):
        return value
    raise ValueError(f"{what}={value!r} must be a {kind.__name__}")
