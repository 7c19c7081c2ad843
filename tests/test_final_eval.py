"""Final evaluation (clean, PGD with restarts, AutoAttack), its resumable state, and the masking checks."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn
from torch.utils.data import TensorDataset

from roli_sweep.config import FinalEvalConfig, MaskingConfig
from roli_sweep.evaluation.final_eval import threat_model
from roli_sweep.evaluation.masking import run_checks
from roli_sweep.records import masking_tags

CHECKS = MaskingConfig(n_examples=64, pgd_steps=10, more_steps=40, square_queries=200)


@pytest.fixture(scope="module")
def digits_linear():
    """A linear classifier trained (clean) on 8x8 digits: healthy gradients, deterministic, easy to break."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8) in [0, 1]
    y = torch.tensor(data.target)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    for _ in range(150):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x[:1200]), y[:1200]).backward()
        opt.step()
    return model.eval(), x[1200:1264], y[1200:1264]


class Quantized(nn.Module):
    """Gradient masking by a non-differentiable input transform: rounding has a zero gradient."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 4) / 4)


class Noisy(nn.Module):
    """Gradient masking by randomness: fresh input noise on every forward pass, even in eval mode."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x + 0.2 * torch.randn_like(x))


def _checks(model, x, y, eps=0.1):
    with torch.no_grad():
        clean = (model(x).argmax(1) == y).float().mean().item()
    from roli_sweep.core.attacks import pgd

    x_adv = pgd(model, x, y, eps, 2.5 * eps / 20, 20, True, torch.Generator().manual_seed(0), prefer_misclassified=True)
    with torch.no_grad():
        robust = (model(x_adv).argmax(1) == y).float().mean().item()
    return {c.name: c for c in run_checks(model, x, y, eps, clean, robust, None, CHECKS, seed=0)}


def test_a_healthy_model_passes_every_check(digits_linear):
    model, x, y = digits_linear
    checks = _checks(model, x, y)
    assert {name: c.status for name, c in checks.items()} == dict.fromkeys(checks, "pass"), checks
    assert masking_tags(list(checks.values()))["masking"] == "pass"


def test_a_non_differentiable_model_is_flagged(digits_linear):
    model, x, y = digits_linear
    checks = _checks(Quantized(model), x, y)
    assert checks["gradients"].status == "warning"  # rounding: every input gradient is exactly zero
    assert checks["eps_sweep"].status == "warning"  # PGD cannot move, so accuracy never reaches ~0
    assert checks["black_box"].status == "warning"  # Square needs no gradient and beats PGD
    tags = masking_tags(list(checks.values()))
    assert tags["masking"] == "warning" and tags["masking.gradients"] == "warning"
    assert "0.0 %" in tags["masking.gradients.detail"]


def test_a_randomised_model_is_flagged(digits_linear):
    model, x, y = digits_linear
    checks = _checks(Noisy(model), x, y)
    assert checks["deterministic"].status == "warning"
    assert checks["gradients"].status == "pass"


def _final_cfg(trial_dict, eps=0.05, **final):
    from roli_sweep.config import TrialConfig

    trial_dict["eval"] = {"eps": eps, "final": {"n_examples": 20, "pgd_steps": 10, "pgd_restarts": 2, "batch_size": 8,
                                                 "masking": {"n_examples": 16, "more_steps": 20}, **final}}
    return TrialConfig.model_validate(trial_dict)


def test_final_evaluation_orders_attacks_resumes_and_reads_square_from_autoattack(tmp_path, digits_linear, trial_dict):
    from roli_sweep.evaluation.final_eval import FinalEvaluation, evaluate_and_check

    model, x, y = digits_linear
    test = TensorDataset(x[:24], y[:24])
    cfg = _final_cfg(trial_dict)
    state = tmp_path / "final.json"
    full = evaluate_and_check(model, test, cfg, 10, torch.device("cpu"), state_path=state)
    m = full.result.metrics()
    assert full.result.threat.n_examples == 20 and len(full.result.clean) == 20
    assert full.result.threat.autoattack == "standard"
    assert m["final_autoattack_acc"] <= m["final_pgd_acc"] <= m["final_clean_acc"]
    assert m["final_clean_acc"] > 0.5 and m["final_pgd_acc"] < m["final_clean_acc"]
    # every attacked example is broken by one stage or robust; black_box reads AutoAttack's Square stage
    assert sum(full.autoattack_stages.values()) == sum(full.result.clean)
    assert full.autoattack_stages["robust"] == sum(full.result.autoattack)
    checks = {c.name: c for c in full.checks}
    assert "AutoAttack's Square broke" in checks["black_box"].detail and len(checks) == 7
    pieces = [p.id for p in FinalEvaluation(cfg, test, 10).pieces()]
    assert pieces == ["batch:0", "batch:1", "batch:2", "check:eps_sweep", "check:more_steps", "check:gradients",
                      "check:logits", "check:deterministic"]

    # interrupted after two pieces: the resumed run computes only the rest and gives the same outcomes
    saved = json.loads(state.read_text())
    saved["pieces"] = {k: v for k, v in saved["pieces"].items() if k in ("batch:0", "check:gradients", "check:logits", "check:deterministic")}
    state.write_text(json.dumps(saved))
    calls = []
    resumed = evaluate_and_check(model, test, cfg, 10, torch.device("cpu"), state_path=state,
                                 on_piece=lambda piece, done, total: calls.append((piece.id, done, total)))
    assert [c[0] for c in calls] == ["batch:1", "batch:2", "check:eps_sweep", "check:more_steps"]
    assert calls[-1][1:] == (8, 8)
    assert (resumed.result.clean, resumed.result.pgd, resumed.result.autoattack) == (
        full.result.clean, full.result.pgd, full.result.autoattack)
    assert [(c.name, c.status, c.detail) for c in resumed.checks] == [(c.name, c.status, c.detail) for c in full.checks]

    with pytest.raises(ValueError, match="threat model"):
        evaluate_and_check(model, test, _final_cfg(trial_dict, pgd_steps=5), 10, torch.device("cpu"), state_path=state)


def test_square_breaking_what_the_white_box_attacks_left_is_flagged(digits_linear, trial_dict):
    """The official AutoAttack's Square check: Square succeeding where APGD and FAB failed means masked gradients."""
    from roli_sweep.evaluation.final_eval import evaluate_and_check

    model, x, y = digits_linear
    cfg = _final_cfg(trial_dict, eps=0.1, n_examples=64, batch_size=64,
                     autoattack={"apgd_steps": 10, "fab_steps": 10, "square_queries": 1000})
    report = evaluate_and_check(Quantized(model), TensorDataset(x, y), cfg, 10, torch.device("cpu"))
    checks = {c.name: c for c in report.checks}
    assert report.autoattack_stages["Square"] > 0, report.autoattack_stages
    assert checks["black_box"].status == "warning", (report.autoattack_stages, checks["black_box"].detail)
    assert checks["gradients"].status == "warning"


def test_the_eps_sweep_stops_once_accuracy_is_zero(digits_linear):
    from roli_sweep.evaluation.masking import measure

    model, x, y = digits_linear
    cfg = MaskingConfig(eps_factors=[1.0, 4.0, 8.0, 16.0], large_eps=0.9)
    swept = measure("eps_sweep", model, x, y, 0.05, cfg, seed=0)
    assert swept["accs"][-1] == 0.0 and len(swept["accs"]) < len(swept["all_radii"])
    assert all(a > 0 for a in swept["accs"][:-1])


def test_autoattack_components_carry_the_published_settings():
    """Standard AutoAttack as published (Croce & Hein, ICML 2020; fra31/auto-attack): APGD-CE 100 iterations,
    APGD-T 100 x 9 targets, FAB-T 100 x 9 targets, Square 5000 queries without the rescaled schedule,
    in that order; K - 1 targets when K <= 10; anything else labelled custom."""
    import torchattacks

    from roli_sweep.evaluation.autoattack import build_autoattack
    from roli_sweep.config import AutoAttackConfig

    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 100))
    published = AutoAttackConfig()
    attacks = build_autoattack(model, 8 / 255, 100, published, seed=0)
    apgd, apgdt, fab, square = attacks
    assert [type(a) for a in attacks] == [torchattacks.APGD, torchattacks.APGDT, torchattacks.FAB, torchattacks.Square]
    assert (apgd.steps, apgd.n_restarts, apgd.loss, apgd.eps) == (100, 1, "ce", 8 / 255)
    assert (apgdt.steps, apgdt.n_restarts, apgdt.n_target_classes) == (100, 1, 9)
    assert (fab.steps, fab.n_restarts, fab.multi_targeted, fab.n_target_classes) == (100, 1, True, 9)
    assert (square.n_queries, square.p_init, square.rescale_schedule, square.n_restarts) == (5000, 0.8, False, 1)
    five = build_autoattack(nn.Sequential(nn.Flatten(), nn.Linear(64, 5)), 8 / 255, 5, published, seed=0)
    assert five[1].n_target_classes == five[2].n_target_classes == 4
    params = threat_model(FinalEvalConfig(), 8 / 255, 100, (3, 32, 32), 100).params()
    assert {k: v for k, v in params.items() if k.startswith("final_eval.autoattack")} == {
        "final_eval.autoattack.version": "standard", "final_eval.autoattack.apgd_steps": "100",
        "final_eval.autoattack.fab_steps": "100", "final_eval.autoattack.target_classes": "9",
        "final_eval.autoattack.square_queries": "5000"}
    assert AutoAttackConfig(apgd_steps=10).version == "custom"


def test_autoattack_attacks_only_clean_correct_examples(digits_linear):
    from roli_sweep.evaluation.autoattack import ROBUST, autoattack_outcomes
    from roli_sweep.config import AutoAttackConfig

    model, x, y = digits_linear
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    seen = []
    hook = model.register_forward_pre_hook(lambda module, args: seen.append(len(args[0])))
    cfg = AutoAttackConfig(apgd_steps=5, fab_steps=5, target_classes=2, square_queries=10)
    rng = torch.random.get_rng_state()
    robust = autoattack_outcomes(model, x, y, correct, 0.1, 10, cfg, seed=0) == ROBUST
    hook.remove()
    assert not correct.all() and not (robust & ~correct).any()
    assert seen and max(seen) <= int(correct.sum()), "misclassified examples are never attacked"
    assert torch.equal(torch.random.get_rng_state(), rng), "the components' reseeding does not leak"


def test_probabilities_instead_of_logits_are_flagged(digits_linear):
    model, x, y = digits_linear
    checks = _checks(nn.Sequential(model, nn.Softmax(dim=1)), x, y)
    assert checks["logits"].status == "warning", checks["logits"].detail


def test_a_new_masking_check_is_one_registered_class(digits_linear):
    """The extension point: a check registered in roli_sweep.evaluation.masking is measured and judged with the others, in
    the sweep's pieces too; a second check of the same name is refused."""
    from roli_sweep.evaluation.masking import CHECKS, Check, MaskingCheck, measured_checks, register_check

    @register_check
    class ZeroLogits(MaskingCheck):
        name = "zero_logits"

        def measure(self, model, x, y, eps, cfg, generator, seed):
            with torch.no_grad():
                return {"zero": bool((model(x) == 0).all(1).any())}

        def judge(self, measured, evidence):
            return Check(self.name, "warning" if measured["zero"] else "pass", f"all-zero logit rows: {measured['zero']}")

    try:
        assert "zero_logits" in measured_checks(autoattack=True)
        model, x, y = digits_linear
        checks = _checks(model, x, y)
        assert checks["zero_logits"].status == "pass" and len(checks) == 8
        with pytest.raises(ValueError, match="registered already"):
            register_check(ZeroLogits)
    finally:
        del CHECKS["zero_logits"]
