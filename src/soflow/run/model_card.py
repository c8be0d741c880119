"""config.json and README.md of a saved pipeline (the Hugging Face Hub layout)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from ..data import traits
from ..version import __version__
from .config import Config, dump

# the diffusers name of the VAE the latent recipes were trained with (a reference, not a download)
SD_VAE = "stabilityai/sd-vae-ft-mse"


def pipeline_config(cfg: Config, sample_shape: Sequence[int], num_classes: int, step: int | None, vae: str | None,
                    guidance: dict | None = None) -> dict:
    """What a reader of the folder needs without soflow: method, network, sample shape, classes,
    the guidance scales it honours (kind: input | trained | sampling, default, range of an input
    model; soflow.guidance) and for latent models the VAE that decodes them.  The full training config is in the weights'
    metadata and in the model card."""
    info = {
        "library": "soflow", "soflow_version": __version__, "method": cfg.method,
        "network": cfg.model.net, "network_args": cfg.model.net_args,
        "path": cfg.model.path, "parameterization": cfg.model.parameterization,
        "sample_shape": list(sample_shape), "num_classes": num_classes, "data": cfg.data.name,
        "training_steps": step,
    }
    if guidance is not None:
        info["guidance"] = guidance
    if traits(cfg.data.name).latent:
        info["vae"] = {"diffusers_name": SD_VAE, "local_path": vae, "scale": 0.18215}
    return info


def model_card(cfg: Config, info: dict, grid: Path | None) -> str:
    """The README.md of a saved pipeline: usage, guidance, sample grid and training config."""
    classes = f"{info['num_classes']} classes" if info["num_classes"] else "unconditional"
    lines = [
        "---", "library_name: soflow", "tags:", "- solution-flow", f"- {cfg.method.replace('_', '-')}",
        "- one-step-generation", "---", "",
        f"# {cfg.method} on {cfg.data.name}", "",
        f"A `{info['network']}` network trained with soflow's `{cfg.method}` method for "
        f"{info['training_steps']} steps on `{cfg.data.name}` ({classes}, samples of shape "
        f"{tuple(info['sample_shape'])}). The weights are the EMA weights.", "",
        "```python", "from soflow import Pipeline", "",
        'pipe = Pipeline.from_pretrained("THIS_FOLDER")', usage_line(info), "```", "",
    ]
    lines += _guidance_lines(info.get("guidance"))
    if "vae" in info:
        lines += [f"Samples are SD-VAE latents, decoded with `{info['vae']['diffusers_name']}` "
                  "(pass a local copy: `Pipeline.from_pretrained(..., vae=FOLDER)`).", ""]
    if grid is not None:
        lines += [f"![1-NFE samples]({grid.name})", ""]
    lines += ["## Training config", "", "```yaml", dump(cfg).rstrip(), "```", ""]
    return "\n".join(lines)


def usage_line(info: dict) -> str:
    """The card's sampling line for this kind of model: PIL images, or a tensor of points."""
    if len(info["sample_shape"]) == 1:
        return (f"points = pipe(num=2000, nfe=1, seed=0, output=\"tensor\")  # [2000, {info['sample_shape'][0]}], "
                "one network evaluation per sample")
    return "images = pipe(num=16, nfe=1, seed=0)  # 16 PIL images, one network evaluation per sample"


def _guidance_lines(guidance: dict | None) -> list[str]:
    """How the card's reader picks a guidance scale (soflow.guidance)."""
    if guidance is None:
        return []
    kind, w = guidance["kind"], guidance["default"]
    if kind == "input":
        lo, hi = guidance["range"]
        text = (f"The network takes the classifier-free guidance scale as an input: `pipe(..., guidance=W)` with W "
                f"in [{lo:g}, {hi:g}] (default {w:g}), one network evaluation per step at any W.")
    elif kind == "trained":
        text = f"Guidance scale {w:g} is built in by training; the model samples at that scale only."
    else:
        text = ("`pipe(..., guidance=W)` applies classifier-free guidance with two network evaluations per step "
                "(where the model has a null class).")
    return [text, ""]
