"""Every `on_*` method our Lightning classes define is a hook Lightning calls on that kind of class.

A method named like a hook that the base class does not have is never called: `DistillModule.on_exception`
was such a method (Lightning calls `on_exception` on callbacks and the datamodule, not on a LightningModule),
and a fit that failed while a teacher-cache view was being built ahead left the thread running."""
from __future__ import annotations

import importlib
import inspect
import pkgutil

import lightning as L
import pytest

import distill


def _our_lightning_classes():
    found = {}
    for info in pkgutil.walk_packages(distill.__path__, "distill."):
        try:
            module = importlib.import_module(info.name)
        except ImportError:  # an optional extra that is not installed
            continue
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ == module.__name__ and issubclass(
                    cls, (L.LightningModule, L.Callback, L.LightningDataModule)):
                found[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return found


CLASSES = _our_lightning_classes()


def test_the_package_has_the_lightning_classes_this_test_checks():
    names = set(CLASSES)
    for expected in ("distill.student.module.DistillModule", "distill.teacher.module.TeacherModule",
                     "distill.data.datamodule.ImageDataModule", "distill.teacher.cache_views.StopViewsBuiltAhead"):
        assert expected in names


@pytest.mark.parametrize("name", sorted(CLASSES))
def test_every_on_method_is_a_hook_lightning_calls(name):
    cls = CLASSES[name]
    base = next(b for b in (L.LightningModule, L.Callback, L.LightningDataModule) if issubclass(cls, b))
    own = [m for m in vars(cls) if m.startswith("on_") and callable(vars(cls)[m])]
    dead = [m for m in own if not hasattr(base, m)]
    assert not dead, f"{name}: {dead} are not {base.__name__} hooks, so Lightning never calls them"
