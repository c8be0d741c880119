"""FID while training: Fréchet Inception Distance of EMA samples every `train.fid_every` steps.

An evaluation draws `train.fid_num` samples from the EMA network at each NFE of `train.fid_nfe`
and each classifier-free guidance scale of `train.fid_guidance` (empty: the model's own scale;
what a scale means for each kind of model: soflow.guidance), decodes latents with the run's
SD-VAE (`data.vae`), quantizes to uint8 as `soflow sample` does, and scores the InceptionV3 pool
features (`train.fid_dims` = 2048, the standard FID; the earlier layers 768, 192 and 64 are cheap
proxies, as with `soflow fid --dims`) against the reference statistics `train.fid_ref`.

The work is spread over the ranks and nothing but sums is exchanged. The global sample indices
0 .. fid_num - 1 are cut into blocks of `train.fid_batch_size`, and rank r takes a contiguous run
of blocks. Sample i comes from its own seed (`soflow.sampling`) and the block boundaries do not
depend on the number of ranks either, so every rank count computes the same features. Each rank
sums, in float64,

    s1 = sum_i (f_i - c)      and      S2 = sum_i (f_i - c)(f_i - c)^T,

one all-reduce adds them over the ranks, and

    mu = c + s1 / n,      sigma = (S2 - s1 s1^T / n) / (n - 1)       (unbiased covariance).

The shift c is the reference mean: the covariance does not depend on it, and features centred
near their mean keep the subtraction from cancelling digits. Memory does not grow with fid_num.

A class-conditional model gets balanced labels: sample i has class i mod K, so each block holds
(nearly) equal class counts and fid_num = 50,000 gives exactly 50 samples per ImageNet class. The
reference code draws uniform random labels instead; balanced labels are a stratified draw from
the same class marginal, without the noise of a random label histogram in the score.

The score runs after the step's checkpoint; a process killed during it resumes after that step,
so that one score is missing from metrics.jsonl. It draws no numbers from the training random
streams, so a run scored this way ends with the weights of one that is not.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import torch

from .. import distributed
from ..data import traits
from ..data.vae import load_vae
from ..errors import CheckpointError, EvalError
from ..eval.fid import frechet_distance, load_stats, metric_name
from ..eval.inception import InceptionFeatures
from ..pipeline import Pipeline
from ..plots import to_uint8
from ..protocols import Dataset
from ..run.build import solution_flow
from ..run.checkpoint import best_fid_paths, read_best_fid, run_state, save_best_fid
from ..run.config import Config
from ..solution import SolutionFlow
from . import parallel
from .ema import EMA
from .runlog import RunLog


class TrainingFID:
    """Set up once per run, before the first step: every file it needs is opened here, so a missing
    or unusable one stops the run at once (EvalError, one line naming the config key).  The loop
    then calls `evaluate(step, flow, ema)` on every rank at the steps where `due(step, total)`."""

    def __init__(self, cfg: Config, data: Dataset, env: distributed.Env, run_dir: str | Path, log: RunLog):
        t = cfg.train
        self.cfg, self.env, self.run_dir, self.log = cfg, env, Path(run_dir), log
        self.every, self.num, self.nfes, self.batch_size = t.fid_every, t.fid_num, list(t.fid_nfe), t.fid_batch_size
        self.scales = list(t.fid_guidance) or [None]  # None: the model's own scale
        self.points = [(nfe, w) for nfe in self.nfes for w in self.scales]
        self.seed, self.metric, self.dims = t.seed, metric_name(*self.points[0]), t.fid_dims
        self.ref_path = str(Path(t.fid_ref).expanduser().resolve())
        self.vae = None
        failure = None
        try:
            self._open(cfg, data)
        except (ValueError, OSError, ImportError, RuntimeError) as e:
            failure = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        failures = [f for f in distributed.all_gather_objects(env, failure) if f]
        if failures:  # every rank stops, not only the one whose file failed
            raise EvalError(failures[0])
        self.best = self._read_best() if env.is_main else None

    def _open(self, cfg, data) -> None:
        t = cfg.train
        if len(data.sample_shape) != 3:
            raise EvalError(f"train.fid_every: FID needs images; {cfg.data.name} samples have shape "
                            f"{tuple(data.sample_shape)}")
        try:
            mu, sigma = load_stats(self.ref_path)
        except EvalError as e:
            raise EvalError(f"train.fid_ref: {e}") from None
        if mu.shape[0] != self.dims:
            raise EvalError(f"train.fid_ref: {self.ref_path} holds statistics of {mu.shape[0]} features, "
                            f"train.fid_dims is {self.dims}; make it with `soflow fid ref --dims {self.dims}`")
        self.ref = (mu, sigma)
        self.shift = torch.as_tensor(mu, dtype=torch.float64, device=self.env.device)
        try:
            self.extractor = InceptionFeatures(t.fid_inception, device=self.env.device, batch_size=self.batch_size,
                                               features=(str(self.dims),))
        except (ValueError, OSError, RuntimeError) as e:  # a missing torch-fidelity is an EvalError too
            raise EvalError(f"train.fid_inception: {e}") from None
        if traits(cfg.data.name).latent:  # latents are decoded to pixels before Inception sees them
            try:
                self.vae = load_vae(cfg.data.vae, self.env.device)
            except ValueError as e:
                raise EvalError(f"data.vae: FID of latent samples decodes them: {e}") from None

    # ------------------------------------------------------------------ when and what

    def due(self, step: int, total_steps: int) -> bool:
        return step % self.every == 0 or step == total_steps

    def evaluate(self, step: int, flow: SolutionFlow, ema: EMA) -> dict[str, float]:
        """Score the EMA network (a collective: every rank calls it), log fid_nfeK to the run's
        metrics, and keep checkpoints/best-fid.pt when the first NFE's score is the best so far."""
        started = time.perf_counter()
        flow_ema = solution_flow(self.cfg, ema.model)
        scores = self.scores(flow_ema)
        self.log.metrics(step, scores, fid_seconds=time.perf_counter() - started)
        record = {"step": step, "metric": self.metric, "score": scores[self.metric], "scores": scores,
                  "num": self.num, "dims": self.dims, "ref": self.ref_path}
        if self._share(self.env.is_main and self._improves(record["score"])):
            self._save_best(step, flow, ema, record)
        return scores

    def _improves(self, score: float) -> bool:
        return math.isfinite(score) and (self.best is None or score < self.best["score"])

    def _share(self, value):
        """Rank 0's value on every rank (decisions that lead into collectives must agree)."""
        return distributed.all_gather_objects(self.env, value)[0]

    # ------------------------------------------------------------------ the score

    def scores(self, flow: SolutionFlow) -> dict[str, float]:
        """{fid_nfeK[_wW]: FID} of `flow`'s samples, the same on every rank.  The matrix square roots
        (seconds each at 2048 features) are shared out: rank j % world scores the j-th (NFE, scale)."""
        mine, failures = {}, []
        for j, (nfe, w) in enumerate(self.points):
            mu, sigma = self.statistics(flow, nfe, w)
            name = metric_name(nfe, w)
            if j % self.env.world == self.env.rank:
                try:
                    mine[name] = frechet_distance(mu, sigma, *self.ref)
                except ValueError as e:  # a failed score must not end hours of training
                    failures.append(f"warning: {name} not computed ({e})")
                    mine[name] = float("nan")
        out = {}
        for part, warnings in distributed.all_gather_objects(self.env, (mine, failures)):
            out.update(part)
            for line in warnings:
                self.log.warn(line)
        return {metric_name(*p): out[metric_name(*p)] for p in self.points}

    @torch.no_grad()
    def statistics(self, flow: SolutionFlow, nfe: int, guidance: float | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Mean and unbiased covariance of the Inception features of all fid_num samples (every rank),
        drawn and decoded as `soflow sample` does (through a Pipeline)."""
        pipe = Pipeline(flow, self.cfg, vae_model=self.vae)
        d = self.shift.numel()
        total = torch.zeros(1 + d + d * d, dtype=torch.float64, device=self.env.device)
        count, s1, s2 = total[:1], total[1:1 + d], total[1 + d:].view(d, d)
        blocks, rounds = self._blocks()
        # A sharded network gathers its weights in every forward, so all ranks make the same number
        # of forwards: a rank with fewer blocks draws one throw-away sample per missing block.
        rounds = rounds if parallel.is_sharded(pipe.flow.net) else len(blocks)
        for k in range(rounds):
            if k >= len(blocks):
                self._sample(pipe, nfe, 0, 1, guidance, decode=False)
                continue
            lo, hi = blocks[k]
            f = self._features(pipe, nfe, lo, hi, guidance) - self.shift
            count += hi - lo
            s1 += f.sum(0)
            s2.addmm_(f.T, f)
        if self.env.distributed:
            torch.distributed.all_reduce(total)
        n = float(count.item())
        mean = s1 / n
        sigma = (s2 - torch.outer(s1, s1) / n) / (n - 1)
        return (self.shift + mean).cpu().numpy(), sigma.cpu().numpy()

    def _blocks(self) -> tuple[list[tuple[int, int]], int]:
        """This rank's [lo, hi) sample ranges, and the most blocks any rank has."""
        size, world = self.batch_size, self.env.world
        num_blocks = math.ceil(self.num / size)
        per_rank = math.ceil(num_blocks / world)
        mine = range(self.env.rank * per_rank, min(num_blocks, (self.env.rank + 1) * per_rank))
        return [(b * size, min(self.num, (b + 1) * size)) for b in mine], per_rank

    def _sample(self, pipe: Pipeline, nfe: int, lo: int, hi: int, guidance: float | None = None,
                decode: bool = True) -> torch.Tensor:
        k = pipe.flow.num_classes
        labels = torch.arange(lo, hi) % k if k else None  # balanced classes (module docstring)
        return pipe.sample(hi - lo, nfe, first=lo, decode=decode, seed=self.seed, labels=labels,
                           mode=self.cfg.train.sample_mode, guidance=guidance, batch_size=self.batch_size)

    def _features(self, pipe: Pipeline, nfe: int, lo: int, hi: int, guidance: float | None = None) -> torch.Tensor:
        """Inception features [hi - lo, fid_dims] (float64, on the run's device) of samples lo .. hi - 1."""
        x = self._sample(pipe, nfe, lo, hi, guidance)
        images = torch.from_numpy(to_uint8(x)).permute(0, 3, 1, 2)  # the rounding of `soflow sample`
        return self.extractor(images).to(self.env.device, torch.float64)

    # ------------------------------------------------------------------ the best checkpoint

    def _read_best(self) -> dict | None:
        """The best score kept by an earlier part of this run, if it was scored the same way."""
        path, _ = best_fid_paths(self.run_dir)
        try:
            best = read_best_fid(self.run_dir)
        except CheckpointError as e:
            self.log.warn(f"warning: {e}; the next FID evaluation replaces it")
            return None
        if best is None:
            return None
        this = (self.metric, self.num, self.dims, self.ref_path)
        if tuple(best.get(k) for k in ("metric", "num", "dims", "ref")) != this:
            self.log.warn(f"warning: {path} was chosen by {best.get('metric')} of {best.get('num')} samples "
                          f"({best.get('dims')} features) against {best.get('ref')}; this run scores {self.metric} of "
                          f"{self.num} samples ({self.dims} features) against {self.ref_path}, so the next FID "
                          "evaluation replaces it")
            return None
        self.log.info(f"best FID so far: {self.metric} {best['score']:.4f} at step {best['step']} ({path})")
        return best

    def _save_best(self, step: int, flow, ema, record: dict) -> None:
        net_state, _ = parallel.full_state(flow.net)  # collectives when sharded
        ema_state, _ = parallel.full_state(ema.model)
        if self.env.is_main:
            # A run checkpoint without optimizer and RNG state: `soflow sample` reads it like any other.
            state = run_state(step, self.cfg.to_dict(), flow.net.sample_shape, flow.num_classes, net_state, ema_state,
                              world_size=self.env.world)
            path = save_best_fid(self.run_dir, state, record)
            self.best = record
            self.log.info(f"best FID: {self.metric} {record['score']:.4f} at step {step}, EMA weights in {path}")
        distributed.barrier(self.env)
