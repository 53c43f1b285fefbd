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
    "build_teacher": "models.build",
    "build_student": "models.build",
    "model_meta": "models.meta",
    "student_heads": "models.heads",
    "TeacherModule": "teacher.module",
    "DistillModule": "student.module",
    "StudentConfig": "student.module",
    "ImageDataModule": "data.datamodule",
    "load_student": "student.module",
    "FrozenTeacher": "teacher.frozen",
    "TeacherEnsemble": "teacher.ensemble",
    "FeatureGuidanceConfig": "student.feature_guidance",
    "TeacherCacheConfig": "teacher.cache",
    "export_hf": "sharing.hf_export",
    "push": "sharing.hub",
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
    from .data.datamodule import ImageDataModule
    from .losses import DistillationLoss, LossTerms
    from .models.build import build_student, build_teacher
    from .models.heads import student_heads
    from .models.meta import model_meta
    from .sharing.hf_export import export_hf
    from .sharing.hub import push
    from .student.feature_guidance import FeatureGuidanceConfig
    from .student.module import DistillModule, StudentConfig, load_student
    from .teacher.cache import TeacherCacheConfig
    from .teacher.ensemble import TeacherEnsemble
    from .teacher.frozen import FrozenTeacher
    from .teacher.module import TeacherModule
