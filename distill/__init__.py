"""distill: DeiT-style knowledge distillation on timm and Lightning.

The public names load on first use (PEP 562 module `__getattr__`): `import distill`, and with it
`distill --help`, does not pay the seconds torch, Lightning and timm take to import, while
`from distill import DistillModule` works as before.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

# public name -> the module that defines it
_EXPORTS = {
    "DistillationLoss": "losses",
    "LossTerms": "losses",
    "build_teacher": "models",
    "build_student": "models",
    "model_meta": "models",
    "student_heads": "models",
    "TeacherModule": "teacher",
    "DistillModule": "student",
    "StudentConfig": "student",
    "ImageDataModule": "data",
    "load_student": "student",
    "FrozenTeacher": "frozen_teacher",
    "TeacherEnsemble": "teacher_ensemble",
    "FeatureGuidanceConfig": "feature_guidance",
    "TeacherCacheConfig": "teacher_cache",
    "export_hf": "hf_export",
    "push": "hub",
}

__all__ = list(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if TYPE_CHECKING:  # for type checkers and IDEs, which do not run __getattr__
    from .data import ImageDataModule
    from .feature_guidance import FeatureGuidanceConfig
    from .hf_export import export_hf
    from .hub import push
    from .frozen_teacher import FrozenTeacher
    from .losses import DistillationLoss, LossTerms
    from .models import build_student, build_teacher, model_meta, student_heads
    from .student import DistillModule, StudentConfig, load_student
    from .teacher import TeacherModule
    from .teacher_cache import TeacherCacheConfig
    from .teacher_ensemble import TeacherEnsemble
