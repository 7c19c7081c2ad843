"""Plain records shared by the evaluation, MLflow and the console, importable without torch or Ray.

A :class:`Check` is one gradient-masking check's outcome (:mod:`roli_sweep.masking`);
:func:`masking_tags` turns a list of them into the MLflow tags every final evaluation carries.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class Check:
    """One check's outcome: ``status`` is ``pass`` or ``warning``; ``detail`` gives the numbers."""

    name: str
    status: str
    detail: str


def masking_tags(checks: list[Check]) -> dict[str, str]:
    """MLflow tags: ``masking`` (pass only if every check passed), ``masking.<check>`` and its detail."""
    tags = {"masking": "pass" if all(c.status == "pass" for c in checks) else "warning"}
    for c in checks:
        tags[f"masking.{c.name}"] = c.status
        tags[f"masking.{c.name}.detail"] = c.detail[:5000]
    return tags


def eps_fraction(eps: float) -> str:
    """An L-inf radius in [0, 1] pixel units as the field writes it: ``8/255`` when it is a whole number of
    255ths, else the decimal (``0.1``)."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else f"{eps:.4g}"


def threat_summary(params: dict[str, str]) -> str:
    """The final evaluation's threat model (its ``final_eval.*`` params) as the field writes it, e.g.
    ``L-inf 8/255, PGD-20 ×5 restarts, AutoAttack standard, 100 test images``."""
    norm = {"Linf": "L-inf"}.get(params.get("final_eval.norm", ""), params.get("final_eval.norm", ""))
    eps = eps_fraction(float(params["final_eval.eps"])) if "final_eval.eps" in params else "?"
    restarts = int(params.get("final_eval.pgd_restarts", "1"))
    pgd = f"PGD-{params.get('final_eval.pgd_steps', '?')}" + (f" ×{restarts} restarts" if restarts > 1 else "")
    version = params.get("final_eval.autoattack.version", "off")
    autoattack = "no AutoAttack" if version == "off" else f"AutoAttack {version}"
    return f"{norm} {eps}, {pgd}, {autoattack}, {params.get('final_eval.n_examples', '?')} test images"
