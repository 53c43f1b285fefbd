"""The former home of the CIFAR ResNets (now `distill.models.cifar_resnet`): `import distill.cifar_resnet`
still registers cifar_resnet* with timm."""
from .models.cifar_resnet import (BasicBlock, CifarResNet, cifar_resnet10, cifar_resnet18,  # noqa: F401
                                  cifar_resnet18_w32, cifar_resnet34)
