"""`Pipeline`: a trained model ready to draw samples, saved and opened in the Hugging Face layout.

    pipe = Pipeline.from_pretrained("runs/fmnist")          # a run folder, checkpoint or saved pipeline
    images = pipe(num=16, nfe=1, labels=3, seed=0)         # 16 PIL images of class 3, one evaluation each
    pipe.save_pretrained("fmnist-soflow")                  # config.json, model.safetensors, README.md

A pipeline holds the network (EMA weights by default), the training method (which decides how its
models are sampled, soflow.methods) and, for latent models, the SD-VAE that decodes the samples.
A saved pipeline folder can be uploaded to the Hub unchanged (`huggingface_hub.upload_folder`) and
is read back with safetensors only: opening one never unpickles anything.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator

import torch
from torch import Tensor

from .data import traits
from .data.vae import decode as decode_latents
from .data.vae import load_vae
from .errors import CheckpointError, ConfigError, DataError
from .guidance import GuidanceScales
from .methods import Method, method
from .plots import image_grid, scatter_panels, to_uint8
from .run.build import guidance_scales as config_guidance_scales
from .run.build import guided_training
from .run.checkpoint import export_safetensors
from .run.config import Config
from .run.load import load_run
from .run.model_card import model_card, pipeline_config
from .sampling import Labels
from .sampling import guidance_problem as sampler_guidance_problem
from .solution import SolutionFlow

if TYPE_CHECKING:
    from diffusers import AutoencoderKL
    from PIL import Image

CONFIG_FILE, WEIGHTS_FILE, CARD_FILE, GRID_FILE = "config.json", "model.safetensors", "README.md", "samples.png"


class Pipeline:
    """A SolutionFlow with its training config: `pipe(num, nfe, ...)` draws samples."""

    def __init__(self, flow: SolutionFlow, config: Config, step: int | None = None, vae: str | None = None,
                 vae_model: AutoencoderKL | None = None):
        """`vae`: the SD-VAE folder of a latent model (default: the run's data.vae); `vae_model`: one
        already loaded."""
        self.flow = flow  # sampling switches it to eval mode and back
        self.config = config  # soflow.run.config.Config of the training run
        self.step = step
        self.vae_path = vae if vae is not None else config.data.vae
        self._vae = vae_model
        self._unfollowed_vae = None  # a data.vae of an opened file that was not followed (from_pretrained)

    # ---------------------------------------------------------------- opening and saving

    @classmethod
    def from_pretrained(cls, source: str | Path, *, weights: str = "ema", device: str | torch.device = "cpu",
                        vae: str | None = None, warn: Callable[[str], None] = print) -> Pipeline:
        """Open a folder written by `save_pretrained` (safetensors only), a run folder (its newest
        checkpoint), a checkpoint file or a safetensors export.  `vae` replaces the run's data.vae.

        A pipeline folder or export is read as a stranger's file: the weights' metadata is the
        authoritative config (a config.json that disagrees with it is refused), and its data.vae is
        followed only when it lies inside the folder; give `vae` otherwise."""
        source, folder = Path(source), None
        if source.is_dir() and (source / CONFIG_FILE).is_file():
            folder, source = source, source / WEIGHTS_FILE
            if not source.is_file():
                raise CheckpointError(f"{source.parent}: has {CONFIG_FILE} but no {WEIGHTS_FILE}")
        cfg, flow, step = load_run(source, weights, device=device, warn=warn)
        if folder is not None:
            check_pipeline_config(folder, pipeline_info(cfg, flow, step))
        shared = folder if folder is not None else source.parent if source.suffix == ".safetensors" else None
        unfollowed = None
        if vae is None and shared is not None and cfg.data.vae:
            vae = vae_inside(cfg.data.vae, shared)
            unfollowed = None if vae else f"{cfg.data.vae!r} (outside {shared})"
            cfg.data.vae = vae
        pipe = cls(flow, cfg, step, vae)
        pipe._unfollowed_vae = unfollowed
        return pipe

    def save_pretrained(self, folder: str | Path, *, grid: bool = True, overwrite: bool = False) -> Path:
        """Write the Hub layout: config.json, model.safetensors (the network's weights, with the
        config in the metadata), README.md (a model card with the training config) and, unless
        grid=False, samples.png (a grid of 1-NFE samples, shown in the card).  A folder that
        already holds files is refused unless overwrite=True."""
        folder = Path(folder)
        if folder.exists() and not folder.is_dir():
            raise ConfigError(f"{folder}: is a file, not a folder; give a new or empty folder")
        if not overwrite and folder.is_dir() and any(folder.iterdir()):
            raise ConfigError(f"{folder}: the folder already holds files; give a new or empty folder, or pass "
                              "overwrite=True to replace the model in it")
        folder.mkdir(parents=True, exist_ok=True)
        net, classes = self.flow.net, self.flow.num_classes
        export_safetensors(folder / WEIGHTS_FILE, net.state_dict(), self.config.to_dict(), self.step or 0,
                           net.sample_shape, classes)
        info = pipeline_info(self.config, self.flow, self.step, self.vae_path, self.guidance_scales.describe())
        (folder / CONFIG_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        grid_file = self._write_grid(folder / GRID_FILE) if grid else None
        (folder / CARD_FILE).write_text(model_card(self.config, info, grid_file), encoding="utf-8")
        return folder

    def _write_grid(self, path: Path) -> Path | None:
        k = self.flow.num_classes
        if self.is_points:
            return scatter_panels(path, {"1 NFE": self.sample(2000, 1)[:, :2]})
        if self.is_latent and not self.vae_path:
            return None  # nothing to decode with
        labels = torch.arange(min(k, 10)).repeat_interleave(8) if k else None
        return image_grid(path, self.sample(len(labels) if k else 64, 1, labels=labels), rows=min(k, 10) or None)

    # ---------------------------------------------------------------- sampling

    @property
    def method(self) -> Method:
        return method(self.config.method)

    @property
    def is_points(self) -> bool:
        return len(self.flow.net.sample_shape) == 1

    @property
    def is_latent(self) -> bool:
        return traits(self.config.data.name).latent

    @property
    def guidance_scales(self) -> GuidanceScales:
        """The guidance scales this model honours (soflow.guidance.GuidanceScales)."""
        return config_guidance_scales(self.config)

    def guidance_problem(self, guidance: float | None) -> str | None:
        """Why this model cannot be sampled at classifier-free guidance scale `guidance` (None: it can)."""
        scales = self.guidance_scales
        problem = scales.problem(guidance)
        if problem is None and scales.kind == "sampling" and guidance is not None:
            problem = sampler_guidance_problem(self.flow, guidance, trained_with_dropout=guided_training(self.config))
        return problem

    def sampler_guidance(self, guidance: float | None) -> float:
        """The scale for soflow.sampling that gives the velocity field of CFG scale `guidance`
        (None: the model's own); one ConfigError line if the model cannot."""
        problem = self.guidance_problem(guidance)
        if problem:
            raise ConfigError(f"guidance {guidance}: {problem}")
        return self.guidance_scales.sampler_scale(guidance)

    def __call__(self, num: int = 1, nfe: int = 1, *, labels: Labels = None, seed: int = 0,
                 guidance: float | None = None, mode: str | None = None, output: str = "pil",
                 batch_size: int = 256) -> list[Image.Image] | Tensor:
        """`num` samples with `nfe` steps each: one network evaluation a step, except Heun's method
        (mode="heun", flow matching), which spends 2 nfe - 1 (soflow.sampling.evaluations).

        guidance: the classifier-free guidance scale of the velocity field sampled (None: the
        model's own; soflow.guidance).  A model trained with guidance_range takes it as an input, a
        fixed-scale SoFlow/MeanFlow model honours its training scale only, and flow matching (or any
        model without built-in guidance) applies it with two forwards per evaluation.

        labels: None (random classes), a class id or one id per sample.  output: "pil" (a list of
        PIL images; image models only) or "tensor" (images in [-1, 1], [num, C, H, W], or points).
        Sample i depends only on (seed, i).
        """
        if output not in ("pil", "tensor"):
            raise ValueError(f"output: choose pil or tensor, got {output!r}")
        if output == "pil" and self.is_points:
            raise ValueError("output='pil': this model draws 2-D points, not images; use output='tensor'")
        x = self.sample(num, nfe, labels=labels, seed=seed, guidance=guidance, mode=mode, batch_size=batch_size)
        return to_pil(x) if output == "pil" else x

    def sample(self, num: int, nfe: int, *, first: int = 0, decode: bool = True, **kw) -> Tensor:
        """Samples first .. first + num - 1 as one tensor: decoded images (raw latents with
        decode=False) or points."""
        for name, value in (("num", num), ("nfe", nfe)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        return torch.cat(list(self.chunks(first, first + num, nfe, decode=decode, **kw)))

    def chunks(self, first: int, last: int, nfe: int, *, decode: bool = True, batch_size: int = 256,
               guidance: float | None = None, **kw) -> Iterator[Tensor]:
        """Samples [first, last) one batch at a time, decoded unless decode=False: memory stays at
        one batch whatever the number of samples (`soflow sample` streams these to disk)."""
        scale = self.sampler_guidance(guidance)
        for x in self.method.sample_chunks(self.flow, first, last, nfe, batch_size=batch_size, guidance=scale,
                                           **kw):
            yield self.decode(x) if decode else x

    @property
    def vae(self) -> AutoencoderKL:
        """The SD-VAE of a latent model, loaded on first use (one line if it cannot be)."""
        if self._vae is None and not self.vae_path and self._unfollowed_vae:
            raise DataError(f"the model's data.vae {self._unfollowed_vae} is not followed: a downloaded model "
                            "names no folder outside its own; pass the SD-VAE folder with --vae (vae= in Python)")
        if self._vae is None:
            self._vae = load_vae(self.vae_path, next(self.flow.parameters()).device)
        return self._vae

    def decode(self, x: Tensor) -> Tensor:
        """Latents -> images in [-1, 1] with the VAE; other samples unchanged."""
        if not self.is_latent:
            return x
        return decode_latents(self.vae, x.float())


# config.json keys that describe the network; the weights' metadata decides them
NETWORK_KEYS = ("method", "network", "network_args", "path", "parameterization", "sample_shape", "num_classes", "data")


def pipeline_info(cfg: Config, flow: SolutionFlow, step: int | None, vae: str | None = None,
                  guidance: dict | None = None) -> dict:
    """The config.json of a pipeline of `flow` trained with `cfg` (`guidance`: the scales it honours)."""
    return pipeline_config(cfg, flow.net.sample_shape, flow.num_classes, step, vae, guidance)


def check_pipeline_config(folder: Path, info: dict) -> None:
    """Refuse a pipeline folder whose config.json says other than its weights' metadata about the
    network (`info`: the config.json the metadata gives), naming the first key that differs."""
    path = folder / CONFIG_FILE
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{path}: not a readable JSON file ({type(e).__name__})") from None
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: expected a JSON object")
    for key in NETWORK_KEYS:
        if saved.get(key) != info[key]:
            raise CheckpointError(f"{path}: {key} is {str(saved.get(key))[:80]} but {info[key]!s:.80} in the metadata "
                                  f"of {WEIGHTS_FILE}, which decides; the folder was altered, so get it again "
                                  "from its source")


def vae_inside(vae: str, folder: Path) -> str | None:
    """The VAE path `vae` (relative ones from `folder`) if it lies inside `folder`, else None."""
    path = Path(vae) if Path(vae).is_absolute() else folder / vae
    try:
        path.resolve().relative_to(folder.resolve())
    except (ValueError, OSError, RuntimeError):
        return None
    return str(path)


def to_pil(images: Tensor) -> list:
    """Images in [-1, 1], [N, C, H, W] -> a list of PIL images (grey for one channel)."""
    from PIL import Image

    return [Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a) for a in to_uint8(images)]
