"""The backbone and the transfer methods. timm imports torchvision, which needs the compatibility shim first on a
CPU-only torch (:mod:`roli_sweep._torchvision_compat`), whichever of these modules is imported first."""
from roli_sweep._torchvision_compat import import_torchvision

import_torchvision()
