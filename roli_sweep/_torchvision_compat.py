"""Import torchvision next to a CPU-only torch build.

The torchvision 0.28.0 wheel on PyPI is a CUDA build. Next to ``torch==2.13.0+cpu`` its import
raises ``RuntimeError: operator torchvision::nms does not exist`` (and so does ``import timm``,
which imports ``torchvision.ops``). Declaring the two missing operator schemas before the import
fixes it; datasets, transforms and models then work, ``torchvision.ops.nms`` does not (roli_sweep
never calls it). See ../shared/ENVIRONMENT.md, "torchvision on a CPU torch".

Call :func:`import_torchvision` before anything imports timm or torchvision. On a machine where
the plain import works (a matching CUDA or CPU build) it does nothing else.
"""
from __future__ import annotations

import types

import torch

_MISSING_OP = "operator torchvision::nms does not exist"
_fragment: torch.library.Library | None = None  # kept alive: the schemas live as long as it does


def import_torchvision() -> types.ModuleType:
    """Return the ``torchvision`` module, declaring missing op schemas only if the import needs it.

    Raises:
        RuntimeError: any import error other than the known missing-``nms`` one.
    """
    global _fragment
    try:
        import torchvision
    except RuntimeError as err:
        if _MISSING_OP not in str(err):
            raise
        _fragment = torch.library.Library("torchvision", "FRAGMENT")
        _fragment.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _fragment.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        import torchvision
    return torchvision
