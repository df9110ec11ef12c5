"""Optimizers with MMSegmentation-style parameter groups, and learning-rate schedules.

Both are built from Hydra ``_partial_`` configs: the trainer calls
``instantiate(cfg.optimizer)(model)`` and ``instantiate(cfg.scheduler)(optimizer, total_steps=N)``.

Stepping contract (read by the trainer from attributes of the returned scheduler):

* ``scheduler.interval`` is ``"iter"`` (call ``scheduler.step()`` after every ``optimizer.step()``;
  ``total_steps`` = total iterations) or ``"epoch"`` (call it once per epoch; ``total_steps`` =
  epochs). The trainer reads ``cfg.scheduler.interval`` to choose ``N`` before building it.
* ``scheduler.monitor`` is ``None``, except for ``plateau``: there it names the validation metric
  (e.g. ``"mIoU"``) and the trainer calls ``scheduler.step(metrics[scheduler.monitor])`` after each
  validation instead of ``step()``.
* Resuming: build optimizer and scheduler from the config as for a new run, then
  ``optimizer.load_state_dict(...)`` and ``scheduler.load_state_dict(...)``; the schedule continues
  exactly. Both state dicts hold only plain values (they load with ``weights_only=True``).
"""

from __future__ import annotations

import bisect
import math
import warnings
from collections.abc import Sequence

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR, LinearLR, ReduceLROnPlateau, SequentialLR

from segexp.errors import ConfigError

_NORM_TYPES = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm,
                                nn.LocalResponseNorm, getattr(nn, "RMSNorm", None)) if t)
# Wrapper prefixes (DistributedDataParallel, torch.compile) that hide "backbone.".
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _plain(value):
    """OmegaConf lists/dicts -> Python containers (lists as tuples, e.g. Adam's ``betas``), so the
    optimizer's state dict holds only plain values."""
    try:
        from omegaconf import DictConfig, ListConfig, OmegaConf
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    return tuple(value) if isinstance(value, list) else value


def _resolve_optimizer(type_name: str) -> type[torch.optim.Optimizer]:
    cls = None
    if "." not in str(type_name):  # "SGD", "adamw": a torch.optim class, any case
        names = {n.lower(): n for n in dir(torch.optim)}
        if str(type_name).lower() in names:
            cls = getattr(torch.optim, names[str(type_name).lower()])
    else:
        from hydra.utils import get_class
        try:
            cls = get_class(str(type_name))
        except Exception:  # hydra raises ImportError or ValueError depending on the failure
            cls = None
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ConfigError(f"optimizer.type={type_name} is not an optimizer class. Give a dotted "
                          "path such as torch.optim.SGD, torch.optim.Adam or torch.optim.AdamW.")
    return cls


def build_optimizer(model: nn.Module, *, type: str = "torch.optim.SGD", lr: float,
                    weight_decay: float = 0.0, head_lr_mult: float = 1.0,
                    norm_bias_weight_decay: float = 0.0, layer_decay: float | None = None,
                    layer_decay_rule: str = "mmseg", no_decay_names: Sequence[str] = (),
                    **kwargs) -> torch.optim.Optimizer:
    """Build ``type`` over up to four parameter groups of ``model``'s trainable parameters.

    * decay / no decay: normalisation-layer parameters and every 1-D parameter (biases, norm
      scales, layer scales) get ``norm_bias_weight_decay`` instead of ``weight_decay``, as do
      parameters whose name contains one of ``no_decay_names`` (e.g. Mask2Former's learnt
      queries and level embeddings, ``query_feat``, ``query_embed``, ``level_embed``);
    * backbone / head: parameters whose name does not start with ``backbone.`` get
      ``lr * head_lr_mult``.

    * layer-wise decay (``layer_decay``, e.g. 0.9 as in the ConvNeXt/BEiT recipes): a backbone
      parameter in layer ``i`` gets ``lr * layer_decay ** (num_layers - i - 1)``, with
      ``num_layers`` and ``layer_id(name)`` from the backbone (MMSegmentation's
      ``LearningRateDecayOptimizerConstructor`` rule: deeper layers learn faster, heads at 1).
      ``layer_decay_rule="eomt"`` is EoMT's official rule instead: the last block at ``lr``,
      block ``i`` of ``L`` at ``lr * layer_decay ** (L - 1 - i)``, the embeddings with block 0
      and the final norm at ``lr`` (the ``mmseg`` rule gives the last block one decay step and
      the embeddings one more than block 0).

    Each group records ``name``, ``lr_mult`` and its ``weight_decay``; schedulers scale every
    group's own initial lr, so the head keeps its multiple. Parameters with
    ``requires_grad=False`` (frozen layers) are left out. ``kwargs`` go to the optimizer
    (``momentum``, ``nesterov``, ``betas``, ``eps``, ...).
    """
    cls = _resolve_optimizer(type)
    for option, value, low in (("lr", lr, 0.0), ("head_lr_mult", head_lr_mult, 0.0)):
        if not float(value) > low:
            raise ConfigError(f"optimizer.{option}={value} must be > 0.")
    for option, value in (("weight_decay", weight_decay),
                          ("norm_bias_weight_decay", norm_bias_weight_decay)):
        if float(value) < 0:
            raise ConfigError(f"optimizer.{option}={value} must be >= 0 (0 disables it).")

    layer_of = _layer_decay_rule(model, layer_decay, layer_decay_rule)
    norm_params = {id(p) for m in model.modules() if isinstance(m, _NORM_TYPES)
                   for p in m.parameters(recurse=False)}
    groups: dict[str, dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        part = "backbone" if name.startswith("backbone.") else "head"
        no_decay = param.ndim <= 1 or id(param) in norm_params or \
            any(part_name in name for part_name in no_decay_names)
        layer, mult = (None, 1.0) if part == "head" or layer_of is None else \
            layer_of(name.removeprefix("backbone."))
        key = (f"{part}_layer{layer}" if layer is not None else part) + \
            ("_no_decay" if no_decay else "")
        if key not in groups:
            mult = mult if part == "backbone" else float(head_lr_mult)
            groups[key] = {"name": key, "params": [], "lr": float(lr) * mult, "lr_mult": mult,
                           "weight_decay": float(norm_bias_weight_decay if no_decay
                                                 else weight_decay)}
        groups[key]["params"].append(param)
    if not groups:
        raise ConfigError("the model has no trainable parameters (all have requires_grad=False); "
                          "unfreeze at least the head (e.g. backbone.frozen_stages).")
    if float(head_lr_mult) != 1.0 and not any(k.startswith("backbone") for k in groups):
        warnings.warn(f"optimizer.head_lr_mult={head_lr_mult} but no trainable parameter's name "
                      "starts with 'backbone.', so every parameter gets the head lr.", stacklevel=2)
    param_groups = sorted(groups.values(), key=lambda g: (g["name"].startswith("head"), g["name"]))
    kwargs = {k: _plain(v) for k, v in kwargs.items()}
    if kwargs.get("fused") == "auto":
        kwargs["fused"] = _fused_choice(cls, [p for g in param_groups for p in g["params"]])
        if kwargs["fused"] is None:
            del kwargs["fused"]
    try:
        return cls(param_groups, lr=float(lr), weight_decay=float(weight_decay), **kwargs)
    except TypeError as err:
        given = ", ".join(f"optimizer.{k}={v}" for k, v in kwargs.items()) or "no extra options"
        raise ConfigError(f"{cls.__module__}.{cls.__name__} does not accept the options given "
                          f"({given}): {err}. Remove the options it does not take (e.g. "
                          "momentum for Adam, betas for SGD).") from err


def _fused_choice(cls: type, params: list[torch.Tensor]) -> bool | None:
    """``fused=auto``: the fused (one kernel for all parameters) implementation where the class
    has one and the parameters are all on the CPU or all on a GPU, else torch's default
    (``foreach``). On this project's CPU an AdamW step over 18 M parameters took 12.5 ms fused
    against 40.7 ms, SGD with momentum 7.8 ms against 13.0 ms."""
    import inspect

    takes_fused = "fused" in inspect.signature(cls.__init__).parameters
    device_types = {p.device.type for p in params}
    return True if takes_fused and len(device_types) == 1 and device_types <= {"cpu", "cuda"} else None


LAYER_DECAY_RULES = ("mmseg", "eomt")


def _layer_decay_rule(model: nn.Module, layer_decay: float | None, rule_name: str = "mmseg"):
    """``name -> (layer id, lr multiplier)`` for backbone parameters, or None without decay."""
    if str(rule_name) not in LAYER_DECAY_RULES:
        raise ConfigError(f"optimizer.layer_decay_rule={rule_name}: choose one of "
                          f"{', '.join(LAYER_DECAY_RULES)}.")
    if layer_decay is None or float(layer_decay) == 1.0:
        return None
    if not 0.0 < float(layer_decay) <= 1.0:
        raise ConfigError(f"optimizer.layer_decay={layer_decay} must be in (0, 1] (e.g. 0.9).")
    backbone = getattr(model, "backbone", None)
    if not (hasattr(backbone, "layer_id") and hasattr(backbone, "num_layers")):
        name = getattr(backbone, "name", type(backbone).__name__)
        raise ConfigError(f"optimizer.layer_decay={layer_decay}: backbone '{name}' does not "
                          "define layers for it (ConvNeXt, Swin and ViT backbones do). Set "
                          "optimizer.layer_decay=null.")
    num_layers = int(backbone.num_layers)  # embeddings (0), blocks (1..L), the rest (L + 1)

    def rule(name: str) -> tuple[int, float]:
        layer = min(int(backbone.layer_id(name)), num_layers - 1)
        if str(rule_name) == "eomt":  # block i of L: decay ** (L - 1 - i); embeddings as block 0
            return layer, float(layer_decay) ** max(num_layers - 2 - max(layer, 1), 0)
        return layer, float(layer_decay) ** (num_layers - layer - 1)

    return rule


# --- schedulers -----------------------------------------------------------------------------

_SCHEDULE_OPTIONS = {
    "poly": {"power": 0.9, "min_lr": 0.0, "min_lr_ratio": None},
    "cosine": {"min_lr": 0.0, "min_lr_ratio": None},
    "step": {"milestones": None, "step_size": None, "gamma": 0.1},
    "plateau": {"monitor": "mIoU", "mode": "max", "factor": 0.1, "patience": 5,
                "threshold": 1e-4, "cooldown": 0, "min_lr": 0.0},
}


class WarmupReduceLROnPlateau(ReduceLROnPlateau):
    """``ReduceLROnPlateau`` with a linear warmup (the OpenVINO recipes' 100-iteration warmup).

    ``step()`` without a metric is a time tick (every iteration, or epoch for interval=epoch):
    the first ``warmup_steps`` ticks raise the lr from ``warmup_start_factor * lr`` to ``lr``;
    later ticks do nothing. ``step(metric)`` after each validation applies the plateau rule once
    the warmup is over (a validation during the warmup does not count)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int = 0,
                 warmup_start_factor: float = 1e-3, **kwargs) -> None:
        super().__init__(optimizer, **kwargs)
        self.warmup_steps = int(warmup_steps)
        self.warmup_start_factor = float(warmup_start_factor)
        self.warmup_done = 0
        self.warmup_base_lrs = [float(g.setdefault("initial_lr", g["lr"]))
                                for g in optimizer.param_groups]
        if self.warmup_steps:
            self._set_warmup_lr()

    def _set_warmup_lr(self) -> None:
        s = self.warmup_start_factor
        factor = s + (1 - s) * self.warmup_done / self.warmup_steps
        for group, base in zip(self.optimizer.param_groups, self.warmup_base_lrs, strict=True):
            group["lr"] = base * factor
        self._last_lr = [g["lr"] for g in self.optimizer.param_groups]

    def step(self, metrics=None, epoch=None) -> None:  # type: ignore[override]
        warming_up = self.warmup_done < self.warmup_steps
        if metrics is None:
            if warming_up:
                self.warmup_done += 1
                self.last_epoch += 1
                self._set_warmup_lr()
            return
        if not warming_up:
            super().step(metrics)


def _min_factors(optimizer, name: str, min_lr: float, min_lr_ratio: float | None) -> list[float]:
    """Per-group floor as a fraction of the group's initial lr."""
    bases = [float(g.get("initial_lr", g["lr"])) for g in optimizer.param_groups]
    if min_lr_ratio is not None:
        if min_lr:
            raise ConfigError(f"scheduler.min_lr={min_lr} and scheduler.min_lr_ratio="
                              f"{min_lr_ratio} are both set; keep one (set the other to 0/null).")
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ConfigError(f"scheduler.min_lr_ratio={min_lr_ratio} must be in [0, 1].")
        return [float(min_lr_ratio)] * len(bases)
    if float(min_lr) < 0:
        raise ConfigError(f"scheduler.min_lr={min_lr} must be >= 0.")
    for group, base in zip(optimizer.param_groups, bases, strict=True):
        if float(min_lr) > base:
            raise ConfigError(
                f"scheduler.min_lr={min_lr} is above the learning rate {base:g} of parameter group "
                f"'{group.get('name', '?')}', so the {name} schedule would raise the lr. Lower it "
                "(e.g. scheduler.min_lr=0) or use scheduler.min_lr_ratio (a fraction of each "
                "group's lr) instead.")
    return [float(min_lr) / base if base > 0 else 0.0 for base in bases]


def _resolve_milestones(milestones, total_steps: int, warmup_steps: int) -> list[int]:
    steps = []
    for m in milestones:
        if isinstance(m, float) and 0.0 < m < 1.0:
            steps.append(round(m * total_steps))  # a fraction of the run
        elif float(m) >= 1 and float(m).is_integer():
            steps.append(int(m))
        else:
            raise ConfigError(f"scheduler.milestones entry {m} must be a step number (an integer "
                              ">= 1) or a fraction of total_steps in (0, 1).")
    steps.sort()
    if steps and not (warmup_steps < steps[0] and steps[-1] <= total_steps):
        raise ConfigError(f"scheduler.milestones={list(milestones)} resolve to steps {steps}, "
                          f"which must lie after warmup_steps={warmup_steps} and by total_steps="
                          f"{total_steps}.")
    return steps


def _main_lambdas(optimizer, name: str, total_steps: int, warmup_steps: int, opts: dict):
    """One closed-form factor function per parameter group; its argument counts steps from the
    end of warmup."""
    decay_steps = total_steps - warmup_steps
    if name in ("poly", "cosine"):
        floors = _min_factors(optimizer, name, opts["min_lr"], opts["min_lr_ratio"])
        if name == "poly":
            power = float(opts["power"])
            if power <= 0:
                raise ConfigError(f"scheduler.power={power} must be > 0 (0.9 or 1.0 are usual).")

            def make(m):
                return lambda t: (1 - m) * (1 - min(t, decay_steps) / decay_steps) ** power + m
        else:
            def make(m):
                return lambda t: m + (1 - m) * 0.5 * (1 + math.cos(
                    math.pi * min(t, decay_steps) / decay_steps))
        return [make(m) for m in floors]
    # step
    gamma = float(opts["gamma"])
    if not 0.0 < gamma <= 1.0:
        raise ConfigError(f"scheduler.gamma={gamma} must be in (0, 1] (0.1 is usual).")
    milestones, step_size = opts["milestones"], opts["step_size"]
    if (milestones is None) == (step_size is None):
        raise ConfigError(f"the step schedule needs exactly one of scheduler.milestones (got "
                          f"{milestones}) and scheduler.step_size (got {step_size}); set the "
                          "other to null.")
    if step_size is not None:
        if int(step_size) < 1:
            raise ConfigError(f"scheduler.step_size={step_size} must be an integer >= 1.")
        size = int(step_size)
        return [lambda t: gamma ** ((t + warmup_steps) // size)] * len(optimizer.param_groups)
    steps = _resolve_milestones(milestones, total_steps, warmup_steps)
    return [lambda t: gamma ** bisect.bisect_right(steps, t + warmup_steps)] \
        * len(optimizer.param_groups)


def _check_replan(name: str, at, planned, total_steps: int, warmup_steps: int,
                  backbone_warmup_steps: int) -> tuple[int, int] | None:
    """``(replanned_at, replanned_from)`` as integers, or None; a clear error where they do not
    describe a re-planned run of this schedule."""
    if at is None and planned is None:
        return None
    if at is None or planned is None:
        raise ConfigError(f"scheduler.replanned_at={at} and scheduler.replanned_from={planned} "
                          "go together (a time-budget run's re-plan: copy both from its "
                          "budget.repeat), or both null.")
    if name == "plateau" or backbone_warmup_steps:
        raise ConfigError(f"scheduler.replanned_at / replanned_from apply to the poly, cosine and "
                          f"step schedules without backbone_warmup_steps, not to this {name} "
                          "schedule; set both to null.")
    at, planned = int(at), int(planned)
    if not warmup_steps <= at < min(planned, total_steps):
        raise ConfigError(f"scheduler.replanned_at={at} must lie at or after the warmup "
                          f"({warmup_steps} steps) and before both scheduler.replanned_from="
                          f"{planned} and the run's length ({total_steps} steps).")
    return at, planned


def _replanned_lambdas(optimizer, name: str, total_steps: int, warmup_steps: int, at: int,
                       planned: int, opts: dict):
    """The factors over ``planned`` steps, whose steps after ``at`` are spread evenly over the
    ``total_steps - at`` the run has instead (see :func:`build_scheduler`)."""
    planned_lambdas = _main_lambdas(optimizer, name, planned, warmup_steps, opts)
    done = at - warmup_steps  # decay steps before the re-plan
    ratio = (planned - at) / (total_steps - at)

    def planned_step(t: float) -> float:
        return t if t <= done else done + (t - done) * ratio

    return [lambda t, factor=factor: factor(planned_step(t)) for factor in planned_lambdas]


def _two_stage_lambdas(optimizer, name: str, total_steps: int, head_warmup: int,
                       backbone_warmup: int, start_factor: float, opts: dict):
    """Per-group factors of the whole run (warmups included) for ``backbone_warmup_steps``."""
    head_decay = _main_lambdas(optimizer, name, total_steps, head_warmup, opts)
    backbone_decay = _main_lambdas(optimizer, name, total_steps, head_warmup + backbone_warmup, opts)

    def head(decay):
        def factor(step: int) -> float:
            if step < head_warmup:
                return start_factor + (1 - start_factor) * step / head_warmup
            return decay(step - head_warmup)
        return factor

    def backbone(decay):
        def factor(step: int) -> float:
            if step < head_warmup:
                return 0.0
            if step < head_warmup + backbone_warmup:
                return (step - head_warmup) / backbone_warmup
            return decay(step - head_warmup - backbone_warmup)
        return factor

    return [backbone(b) if str(g.get("name", "")).startswith("backbone") else head(h)
            for g, h, b in zip(optimizer.param_groups, head_decay, backbone_decay, strict=True)]


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, total_steps: int,
                    interval: str = "iter", warmup_steps: int = 0,
                    warmup_start_factor: float = 1e-3, backbone_warmup_steps: int = 0,
                    replanned_at: int | None = None, replanned_from: int | None = None,
                    **options):
    """A torch lr scheduler for ``optimizer``, with attributes ``interval`` and ``monitor``.

    ``name``, with its ``options`` (defaults in brackets):

    * ``poly``: ``lr = (lr0 - min_lr) * (1 - t/T)^power + min_lr`` [power 0.9, min_lr 0], as
      MMSegmentation's PolyLR (its default is min_lr 1e-4). ``min_lr`` is absolute, the same for
      every group; ``min_lr_ratio`` instead sets the floor as a fraction of each group's lr.
    * ``cosine``: ``lr = min_lr + (lr0 - min_lr) * (1 + cos(pi t/T)) / 2`` [min_lr 0], as
      CosineAnnealingLR's eta_min; ``min_lr_ratio`` as for poly.
    * ``step``: multiply by ``gamma`` [0.1] at each of ``milestones`` (step numbers counted from
      the start of training, or fractions of ``total_steps`` such as 0.75) or every ``step_size``
      steps; exactly one of the two.
    * ``plateau``: ReduceLROnPlateau [monitor mIoU, mode max, factor 0.1, patience 5, threshold
      1e-4, cooldown 0, min_lr 0 (absolute)], stepped with the monitored validation metric.

    ``t`` counts steps after the warmup and ``T = total_steps - warmup_steps``, so the decay ends
    exactly at ``total_steps``. With ``warmup_steps > 0`` the lr first rises linearly from
    ``warmup_start_factor * lr0`` to ``lr0`` (``LinearLR``, chained with ``SequentialLR``; for
    plateau the first ``warmup_steps`` calls of ``step(metric)`` do the warmup).

    ``replanned_at=R, replanned_from=N``: a time-budget run that re-planned its length at step
    ``R`` (:mod:`segexp.engine.budget`): the schedule is the one over ``N`` steps up to ``R``, and
    its rest is stretched (or compressed) evenly to end at ``total_steps``; the lr stays
    continuous and reaches the floor at the end. The run records both, so
    ``trainer.max_iters=<total>`` with them repeats it exactly.

    ``backbone_warmup_steps > 0`` is EoMT's two-stage warmup: the backbone's parameter groups
    stay at lr 0 (the pretrained encoder frozen) while the others warm up over ``warmup_steps``,
    then rise linearly from 0 over ``backbone_warmup_steps``; each part then decays over the steps
    left after its own warmup, both reaching the floor at ``total_steps`` (poly, cosine, step).

    poly, cosine and step are closed-form ``LambdaLR`` factors, one per parameter group: torch's
    PolynomialLR has no floor, and the chainable forms of CosineAnnealingLR / MultiStepLR count
    from the start of their SequentialLR stage; a closed form keeps group multiples exact, gives
    MMSegmentation's values and resumes bit-exactly.
    """
    name = str(name)
    if name not in _SCHEDULE_OPTIONS:
        raise ConfigError(f"scheduler.name={name} is unknown; choose one of "
                          f"{', '.join(_SCHEDULE_OPTIONS)}.")
    if interval not in ("iter", "epoch"):
        raise ConfigError(f"scheduler.interval={interval} must be 'iter' (step every iteration) "
                          "or 'epoch' (step every epoch).")
    unknown = sorted(set(options) - set(_SCHEDULE_OPTIONS[name]))
    if unknown:
        raise ConfigError(f"scheduler option(s) {', '.join(unknown)} do not apply to the {name} "
                          f"schedule, which takes {', '.join(_SCHEDULE_OPTIONS[name])}; "
                          "remove them.")
    opts = {**_SCHEDULE_OPTIONS[name], **{k: _plain(v) for k, v in options.items()}}
    total_steps, warmup_steps = int(total_steps), int(warmup_steps)
    if total_steps < 1:
        raise ConfigError(f"total_steps={total_steps}: the schedule needs at least one step "
                          "(total iterations for interval=iter, epochs for interval=epoch).")
    if warmup_steps < 0:
        raise ConfigError(f"scheduler.warmup_steps={warmup_steps} must be >= 0.")
    if warmup_steps >= total_steps:
        # A recipe's warmup in a shortened run (trainer=debug, a smoke test): shrink, don't fail.
        warnings.warn(f"scheduler.warmup_steps={warmup_steps} is not shorter than the run "
                      f"({total_steps} {interval}s); warming up over {total_steps - 1} instead.",
                      stacklevel=2)
        warmup_steps = total_steps - 1
    if not 0.0 < float(warmup_start_factor) <= 1.0:
        raise ConfigError(f"scheduler.warmup_start_factor={warmup_start_factor} must be in (0, 1].")
    backbone_warmup_steps = int(backbone_warmup_steps)
    if backbone_warmup_steps < 0:
        raise ConfigError(f"scheduler.backbone_warmup_steps={backbone_warmup_steps} must be >= 0.")
    if backbone_warmup_steps and name == "plateau":
        raise ConfigError("scheduler.backbone_warmup_steps applies to the poly, cosine and step "
                          "schedules, not plateau; set it to 0.")
    if backbone_warmup_steps and warmup_steps + backbone_warmup_steps >= total_steps:
        both = warmup_steps + backbone_warmup_steps
        warnings.warn(f"scheduler.warmup_steps + backbone_warmup_steps = {both} is not shorter than "
                      f"the run ({total_steps} {interval}s); both shrink in proportion.", stacklevel=2)
        warmup_steps = (total_steps - 1) * warmup_steps // both
        backbone_warmup_steps = max(total_steps - 1 - warmup_steps, 0)

    replan = _check_replan(name, replanned_at, replanned_from, total_steps, warmup_steps,
                           backbone_warmup_steps)

    if name == "plateau":
        if opts["mode"] not in ("min", "max"):
            raise ConfigError(f"scheduler.mode={opts['mode']} must be 'max' (metrics such as "
                              "mIoU) or 'min' (losses).")
        if not 0.0 < float(opts["factor"]) < 1.0:
            raise ConfigError(f"scheduler.factor={opts['factor']} must be in (0, 1).")
        scheduler = WarmupReduceLROnPlateau(
            optimizer, warmup_steps=warmup_steps, warmup_start_factor=float(warmup_start_factor),
            mode=opts["mode"], factor=float(opts["factor"]), patience=int(opts["patience"]),
            threshold=float(opts["threshold"]), cooldown=int(opts["cooldown"]),
            min_lr=opts["min_lr"])
        scheduler.monitor = str(opts["monitor"])
    elif backbone_warmup_steps:
        scheduler = LambdaLR(optimizer, _two_stage_lambdas(
            optimizer, name, total_steps, warmup_steps, backbone_warmup_steps,
            float(warmup_start_factor), opts))
        scheduler.monitor = None
    else:
        if replan is None:
            lambdas = _main_lambdas(optimizer, name, total_steps, warmup_steps, opts)
        else:
            lambdas = _replanned_lambdas(optimizer, name, total_steps, warmup_steps, *replan, opts)
        if warmup_steps:
            warmup = LinearLR(optimizer, start_factor=float(warmup_start_factor), end_factor=1.0,
                              total_iters=warmup_steps)
            main = LambdaLR(optimizer, lambdas)
            scheduler = SequentialLR(optimizer, [warmup, main], milestones=[warmup_steps])
        else:
            scheduler = LambdaLR(optimizer, lambdas)
        scheduler.monitor = None
    scheduler.interval = interval
    return scheduler


def describe_param_groups(optimizer: torch.optim.Optimizer) -> str:
    """One line per group (name, tensors, lr, weight decay) for the training log."""
    lines = []
    for g in optimizer.param_groups:
        count = sum(p.numel() for p in g["params"])
        lines.append(f"{g.get('name', '?')}: {len(g['params'])} tensors, {count:,} params, "
                     f"lr {g['lr']:.3g}, weight_decay {g['weight_decay']:.3g}")
    return "\n".join(lines)


__all__ = ["build_optimizer", "build_scheduler", "WarmupReduceLROnPlateau",
           "describe_param_groups"]
