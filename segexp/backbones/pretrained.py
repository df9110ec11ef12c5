"""Where a backbone's initial weights come from: ``backbone.pretrained`` = auto | true | false.

* ``auto`` (every backbone config's default): the published pretrained weights when they can be
  had - from the local cache (timm reads most weights through the Hugging Face hub cache, some
  through torch.hub's), else downloaded if the hub answers within :data:`PROBE_TIMEOUT_S`
  seconds (never tried when ``HF_HUB_OFFLINE`` is set); otherwise one warning line and training
  from scratch.
* ``true``: the weights (same sources, same quick check of the hub) or a :class:`ConfigError`
  saying how to get them.
* ``false``: from scratch, on purpose, silently.

Every backbone exposes what it chose as ``pretrained_source``, a :class:`PretrainedSource` whose
``kind`` is ``imagenet`` (ImageNet weights; another pretraining set is named by timm's tag, e.g.
``lvd142m`` for DINOv2), ``checkpoint`` (a local file, ``backbone.checkpoint``) or ``none``, and
whose ``detail`` says which weights and from where. Runs record both (``metrics.json``, logger
tags ``pretrained:<kind>``, W&B config and summary).
"""

from __future__ import annotations

import logging
import os
import re
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from segexp.errors import ConfigError, first_line

log = logging.getLogger(__name__)

PRETRAINED_MODES = ("auto", "true", "false")
# How long `auto` waits for the hub to answer before training from scratch.
PROBE_TIMEOUT_S = 5.0


@dataclass(frozen=True)
class PretrainedSource:
    """What a backbone's weights were initialised from: ``kind`` (``imagenet``, another data set
    named by timm's tag, ``checkpoint`` or ``none``) and a ``detail`` saying which and whence."""

    kind: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind} ({self.detail})"

    def record(self) -> dict[str, str]:
        """The run summary's fields (``metrics.json``, W&B config and summary)."""
        return {"pretrained": self.kind, "pretrained_source": str(self)}


_SKIPPED: ContextVar[bool] = ContextVar("segexp_pretrained_skipped", default=False)


@contextmanager
def no_pretrained_weights() -> Iterator[None]:
    """Backbones built inside take ``pretrained=false`` whatever their config says, and warn about
    nothing: for models whose trained weights are loaded next (evaluation, export, inference) or
    that need none (benchmarks, meta-device counts), so nothing is fetched for nothing."""
    token = _SKIPPED.set(True)
    try:
        yield
    finally:
        _SKIPPED.reset(token)


def pretrained_skipped() -> bool:
    """Inside :func:`no_pretrained_weights`."""
    return _SKIPPED.get()


def pretrained_mode(value: Any) -> str:
    """``backbone.pretrained`` as ``"auto"``, ``"true"`` or ``"false"`` (YAML booleans or strings);
    ``"false"`` inside :func:`no_pretrained_weights`."""
    if isinstance(value, bool):
        mode = "true" if value else "false"
    elif isinstance(value, str) and value.strip().lower() in PRETRAINED_MODES:
        mode = value.strip().lower()
    else:
        raise ConfigError(f"backbone.pretrained={value!r}: choose auto (the published pretrained "
                          "weights when they can be had, else from scratch with a warning), true "
                          "(the weights or stop) or false (from scratch).")
    return "false" if pretrained_skipped() else mode


def checkpoint_source(path: str | Path) -> PretrainedSource:
    return PretrainedSource("checkpoint", str(Path(path).expanduser().resolve()))


def scratch_source(mode: str, reason: str) -> PretrainedSource:
    return PretrainedSource("none", "pretrained=false" if mode == "false" else f"auto: {reason}")


def warn_from_scratch(name: str, tried: str, remedy: str, frozen: bool = False) -> None:
    """The single line ``auto`` logs when it finds no weights a user would expect."""
    outcome = ("the frozen backbone keeps random weights and only the head learns" if frozen
               else "training from scratch")
    log.warning(f"backbone '{name}': no pretrained weights ({tried}); {outcome}. To use them, "
                f"{remedy}; backbone.pretrained=false silences this warning.")


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) set now or when huggingface_hub was imported."""
    import huggingface_hub.constants as hub_constants

    from_env = any(os.environ.get(key, "").strip().upper() in ("1", "ON", "YES", "TRUE")
                   for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))
    return from_env or bool(hub_constants.HF_HUB_OFFLINE)


def create_timm_model(name: str, mode: str, kwargs: dict[str, Any], *,
                      frozen: bool = False) -> tuple[nn.Module, PretrainedSource]:
    """``timm.create_model(name, **kwargs)`` with ``backbone.pretrained=mode`` (no checkpoint
    given). Cached weights are loaded from their file, so nothing waits on the network."""
    if mode == "false" or not timm.is_model(name):  # (timm says what is wrong with a name)
        return timm.create_model(name, pretrained=False, **kwargs), scratch_source(mode, "")
    weights = _TimmWeights(name, kwargs)
    if weights.cfg is None:
        if mode == "true":
            raise ConfigError(f"backbone.pretrained=true: timm has no pretrained weights for "
                              f"'{name}'. Pass backbone.checkpoint=/path/to/weights.pth (or "
                              ".safetensors), or train from scratch with backbone.pretrained=false.")
        # Nothing published, so nothing a user would expect: from scratch without a warning,
        # unless the backbone is frozen (random features that never train).
        if frozen:
            warn_from_scratch(name, f"timm has none for '{name}'",
                              "pass backbone.checkpoint=/path/to/weights", frozen)
        return (timm.create_model(name, pretrained=False, **kwargs),
                scratch_source(mode, f"timm has no pretrained weights for '{name}'"))

    cached = weights.cached_file()
    if cached is not None:
        log.info(f"backbone '{name}': timm's {weights.full_name} weights from {cached}")
        overlay = {**(kwargs.get("pretrained_cfg_overlay") or {}), "file": str(cached),
                   "custom_load": weights.cached_custom_load}
        try:
            model = timm.create_model(name, pretrained=True,
                                      **{**kwargs, "pretrained_cfg_overlay": overlay})
        except Exception as err:
            raise ConfigError(f"backbone '{name}': the cached weights file {cached} could not be "
                              f"loaded ({type(err).__name__}: {first_line(err)}). Delete it so it "
                              "is fetched again, or set backbone.pretrained=false.") from err
        return model, PretrainedSource(weights.kind, f"timm: {weights.full_name}, local cache")

    not_cached = f"timm's {weights.full_name} is not in the local cache ({weights.cache_dirs()})"
    remedy = (f"fetch them once where there is network (python -c \"import timm; "
              f"timm.create_model('{weights.full_name}', pretrained=True)\" fills the cache; copy "
              f"it here if need be) or pass backbone.checkpoint=/path/to/a/state_dict.safetensors "
              f"of timm's '{name}'")
    if hub_offline():
        if mode == "true":
            raise _download_error(name, f"{not_cached} and HF_HUB_OFFLINE is set")
        warn_from_scratch(name, f"{not_cached}; HF_HUB_OFFLINE is set, so no download was tried",
                          remedy, frozen)
        return (timm.create_model(name, pretrained=False, **kwargs),
                scratch_source(mode, "offline, no cached weights"))
    # Asked first, briefly: the hub client retries an unreachable host for most of a minute.
    unreachable = _unreachable(weights.download_url(), PROBE_TIMEOUT_S)
    if unreachable:
        if mode == "true":
            raise _download_error(name, f"{not_cached} and {unreachable}")
        warn_from_scratch(name, f"{not_cached} and {unreachable}", remedy, frozen)
        return (timm.create_model(name, pretrained=False, **kwargs),
                scratch_source(mode, "hub unreachable, no cached weights"))
    try:
        model = timm.create_model(name, pretrained=True, **kwargs)
    except Exception as err:
        if isinstance(err, RuntimeError) and ("state_dict" in str(err) or "size mismatch" in str(err)):
            raise  # weights that do not fit the model: a bug to see, not a network failure
        if mode == "true":
            raise _download_error(name, f"{type(err).__name__}: {first_line(err)[:200]}") from err
        warn_from_scratch(name, f"{not_cached} and downloading it failed ({type(err).__name__}: "
                          f"{first_line(err)[:200]})", remedy, frozen)
        return (timm.create_model(name, pretrained=False, **kwargs),
                scratch_source(mode, "download failed"))
    return model, PretrainedSource(weights.kind, f"timm: {weights.full_name}, downloaded")


def _download_error(name: str, reason: str) -> ConfigError:
    return ConfigError(
        f"could not download pretrained weights for backbone '{name}' ({reason}). Without "
        f"network, download the timm weights for '{name}' elsewhere and pass "
        "backbone.checkpoint=/path/to/weights.pth (or .safetensors), or train from scratch with "
        "backbone.pretrained=false (or auto: the weights when available).")


def _weights_kind(tag: str) -> str:
    """``imagenet`` for timm's ImageNet tags (``a1_in1k``, ``fb_in22k_ft_in1k``), else the tag's
    last part, its pretraining set (``lvd142m`` for DINOv2)."""
    if re.search(r"(^|_)in(1|12|21|22)k(_|$)", tag):
        return "imagenet"
    return tag.rsplit("_", 1)[-1] if tag else "pretrained"


class _TimmWeights:
    """timm's pretrained config for a model name and where its weights would be cached."""

    def __init__(self, name: str, kwargs: dict[str, Any]) -> None:
        from timm.models import resolve_pretrained_cfg, split_model_name_tag

        arch, tag = split_model_name_tag(name)
        try:
            cfg = resolve_pretrained_cfg(arch, pretrained_cfg=kwargs.get("pretrained_cfg") or tag or None,
                                         pretrained_cfg_overlay=kwargs.get("pretrained_cfg_overlay"))
        except RuntimeError as err:  # an unknown tag
            raise ConfigError(f"backbone.name={name}: {err}") from err
        self.cfg = cfg.to_dict() if (cfg.hf_hub_id or cfg.url or cfg.file) else None
        self.full_name = f"{cfg.architecture or arch}.{cfg.tag}" if cfg.tag else arch
        self.kind = _weights_kind(cfg.tag or "")
        self.cache_dir = kwargs.get("cache_dir")
        self.cached_custom_load: bool | str = False

    def _hub_cache(self) -> Path:
        import huggingface_hub.constants as hub_constants

        return Path(self.cache_dir or hub_constants.HF_HUB_CACHE).expanduser()

    def _url_cache(self) -> Path:
        return Path(self.cache_dir or Path(torch.hub.get_dir()) / "checkpoints").expanduser()

    def cache_dirs(self) -> str:
        dirs = [str(self._hub_cache())] if self.cfg.get("hf_hub_id") else []
        if self.cfg.get("url") and str(self._url_cache()) not in dirs:
            dirs.append(str(self._url_cache()))
        return " or ".join(dirs)

    def cached_file(self) -> Path | None:
        """The weights file already on this machine: the Hugging Face hub cache (timm's usual
        source), else torch.hub's (weights timm fetches by URL). No network."""
        if self.cfg.get("file"):
            return Path(self.cfg["file"])
        hub_id = self.cfg.get("hf_hub_id")
        if hub_id and self.cfg.get("custom_load") != "hf":
            from huggingface_hub import try_to_load_from_cache

            repo_id, _, revision = hub_id.partition("@")
            filename = self.cfg.get("hf_hub_filename") or "pytorch_model.bin"
            for candidate in (*_safetensors_names(filename), filename):
                found = try_to_load_from_cache(repo_id, candidate, cache_dir=self._hub_cache(),
                                               revision=revision or None)
                if isinstance(found, str) and Path(found).is_file():
                    return Path(found)
        url = self.cfg.get("url")
        if url:
            path = self._url_cache() / os.path.basename(urlparse(url).path)
            if path.is_file():
                self.cached_custom_load = bool(self.cfg.get("custom_load"))  # e.g. ViT .npz files
                return path
        return None

    def download_url(self) -> str:
        """What timm would fetch first (the hub file, else the URL): the reachability probe's target."""
        hub_id = self.cfg.get("hf_hub_id")
        if hub_id:
            from huggingface_hub import hf_hub_url

            repo_id, _, revision = hub_id.partition("@")
            filename = self.cfg.get("hf_hub_filename") or "pytorch_model.bin"
            return hf_hub_url(repo_id, next(iter(_safetensors_names(filename)), filename),
                              revision=revision or None)
        return self.cfg["url"]


def _safetensors_names(filename: str) -> tuple[str, ...]:
    """The safetensors files timm prefers to a ``.bin`` on the hub (timm.models._hub)."""
    if filename == "pytorch_model.bin":
        return ("model.safetensors",)
    if filename == "open_clip_pytorch_model.bin":
        return ("open_clip_model.safetensors",)
    if filename.endswith(".bin"):
        return (filename[:-4] + ".safetensors",)
    return ()


def _unreachable(url: str, timeout: float) -> str | None:
    """Why the server of ``url`` cannot be reached, or None when it answers a HEAD request within
    ``timeout`` seconds (any HTTP status counts). The request runs in a daemon thread so that a
    hanging name lookup, which socket timeouts do not cover, cannot hold training up either."""
    host = urlparse(url).netloc
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            with urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout):
                outcome.append(None)
        except urllib.error.HTTPError:  # the server is there; the download will say the rest
            outcome.append(None)
        except Exception as err:
            reason = getattr(err, "reason", err)
            if isinstance(reason, TimeoutError):  # the socket's own timeout: the same silence
                outcome.append(silent)
            else:
                outcome.append(f"{host} cannot be reached ({type(err).__name__}: {reason})")

    silent = f"{host} did not answer within {timeout:g} s"
    thread = threading.Thread(target=probe, name="segexp-hub-probe", daemon=True)
    thread.start()
    thread.join(timeout)
    return outcome[0] if outcome else silent
