"""Golden values from the reference implementation, loaded through the checkpoint converter.

Sizes, batch and cases come from the fixture set's cases.json, so another fixture set made the
same way (other seeds, sizes, batch) runs unchanged.
"""

import pytest
import torch
from safetensors.torch import load_file

from conftest import reference_cases, reference_dir
from soflow.objectives import Rows, SoFlowLoss
from soflow.paths import interpolate
from soflow.reference import load_into, network_from_reference_args, read_reference_checkpoint
from soflow.solution import SolutionFlow
from soflow.times import guidance_decay, middle_ratio, middle_time

CASES = reference_cases()
RTOL, ATOL = 1e-4, 1e-5
SCHEDULES = ("Const", "Linear", "Cosine", "Exponent")


def test_reference_fixture_set_present():
    assert len(CASES["cases"]) == 5, f"expected the 5 reference cases in {reference_dir()}"


def close(name, got, want):
    got = got.reshape(want.shape).to(want.dtype)
    err = (got - want).abs().max().item()
    assert torch.allclose(got, want, rtol=RTOL, atol=ATOL), f"{name}: max abs error {err:.3g}"


class Case:
    """One fixture case: the network loaded from a reference-format checkpoint, and its tensors."""

    def __init__(self, case: dict, tmp_path):
        self.case = case
        self.data = load_file(reference_dir() / case["file"])
        prefix = case.get("weights_prefix", "weights/")
        weights = {k[len(prefix):]: v for k, v in self.data.items() if k.startswith(prefix)}
        # Write the weights the way the reference trainer saves them, then convert.
        ckpt = tmp_path / "reference.pt"
        net_state = {"network." + k: v for k, v in weights.items()}
        torch.save({"model": net_state, "ema_model": net_state, "optimizer": {}, "finished_steps": 0,
                    "finished_epochs": 0}, ckpt)
        net = network_from_reference_args(case["kind"], CASES["reference_configs"][case["kind"]])
        load_into(net, read_reference_checkpoint(ckpt, "model"), source=str(ckpt))
        self.flow = SolutionFlow(net, case["noising"], case["coef"]).train()
        self.net = net
        d = self.data
        self.x0, self.x1, self.t, self.s, self.l = d["x0"], d["x1"], d["t"], d["s"], d["l"]
        self.labels = d["labels"] if "labels" in d else None
        self.aug = d["augment_labels"] if "augment_labels" in d else None
        self.x_t = interpolate(self.flow.path, self.x0, self.x1, self.t)

    def expect(self, key):
        return self.data["expect/" + key]

    def rows(self):
        mask = self.data["cfg_mask"].bool() if self.labels is not None else None
        labels = None
        if self.labels is not None:
            labels = torch.where(mask, torch.full_like(self.labels, self.net.num_classes), self.labels)
        common = dict(labels=labels, cfg_mask=mask, augment_labels=self.aug)
        fm = Rows(self.x0, self.x1, self.t, self.t, **common)
        cons = Rows(self.x0, self.x1, self.t, self.s, self.l, **common)
        return fm, cons

    def loss(self):
        c = self.case
        return SoFlowLoss(p=c["p"], eps=c["eps"], cfg_scale=c["cfg_scale"], mix_ratio=c["mix_ratio"],
                          cfg_decay_time=c["cfg_decay_time"])


ids = [c["name"] for c in CASES["cases"]]


@pytest.fixture(params=CASES["cases"], ids=ids)
def case(request, tmp_path):
    return Case(request.param, tmp_path)


def test_reference_interpolant(case):
    close("x_t", case.x_t, case.expect("x_t"))


def test_reference_solution_and_velocity(case):
    flow, x, t = case.flow, case.x_t, case.t
    with torch.no_grad():
        close("solution", flow.solution(x, t, case.s, case.labels, case.aug), case.expect("solution"))
        null = None if case.labels is None else torch.full_like(case.labels, case.net.num_classes)
        close("solution_uncond", flow.solution(x, t, case.s, null, case.aug), case.expect("solution_uncond"))
        close("identity", flow.solution(x, t, t, case.labels, case.aug), case.expect("identity"))
        close("velocity", flow.velocity(x, t, case.labels, case.aug), case.expect("velocity"))


def test_reference_guidance_decay(case):
    grid = torch.linspace(0, 1, case.expect("cfg_decay_scale").numel())
    close("cfg_decay_scale", guidance_decay(grid, case.case["cfg_decay_time"]), case.expect("cfg_decay_scale"))


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_reference_middle_time(case, schedule):
    c = case.case
    rows = [middle_time(case.t, case.s, middle_ratio(schedule, k, c["middle_time_total"], c["middle_time_init_ratio"],
                                                    c["middle_time_end_ratio"])) for k in c["middle_time_steps"]]
    close(f"middle_time/{schedule}", torch.stack(rows), case.expect(f"middle_time/{schedule}"))


@pytest.mark.parametrize("which", ["velocity", "consistency"])
def test_reference_losses_and_gradients(case, which):
    fm, cons = case.rows()
    velocity_loss, consistency_loss, stats = case.loss().losses(case.flow, fm, cons)
    loss = velocity_loss if which == "velocity" else consistency_loss
    close(f"{which}_loss", loss, case.expect(f"{which}_loss"))
    close(f"{which}_mse", stats[f"{which}_mse"], case.expect(f"{which}_mse"))
    close(f"{which}_weight", stats[f"{which}_weight"], case.expect(f"{which}_weight"))
    params = {n: p for n, p in case.net.named_parameters() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    expected = {k.split("_grad/", 1)[1] for k in case.data if k.startswith(f"expect/{which}_grad/")}
    assert expected == set(params), "fixture and network disagree on the parameter set"
    for name, g in zip(params, grads):
        close(f"{which}_grad/{name}", torch.zeros_like(params[name]) if g is None else g,
              case.expect(f"{which}_grad/{name}"))
