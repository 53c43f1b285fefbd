"""distill: DeiT-style knowledge distillation on timm and Lightning."""
from .data import ImageDataModule
from .losses import DistillationLoss, LossTerms
from .models import build_student, build_teacher, model_meta, student_heads
from .student import DistillModule, StudentConfig, load_student
from .teacher import TeacherModule

__all__ = [
    "DistillationLoss",
    "LossTerms",
    "build_teacher",
    "build_student",
    "model_meta",
    "student_heads",
    "TeacherModule",
    "DistillModule",
    "StudentConfig",
    "ImageDataModule",
    "load_student",
]
__version__ = "0.1.0"
