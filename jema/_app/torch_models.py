"""PyTorch twins of the demo's models, to check that the exported ``ema_net`` loads and agrees.

Imported only by the demo's final check: ``import jema`` never imports torch.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


class TorchDigitsCNN(nn.Module):
    """The PyTorch twin of ``jema._app.models.DigitsCNN`` (same names, NCHW).

    Example:
      >>> TorchDigitsCNN(4)(torch.zeros(2, 1, 8, 8)).shape
      torch.Size([2, 10])
    """

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.bn2 = nn.BatchNorm2d(2 * width)
        self.fc = nn.Linear(2 * width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The logits of a batch of NCHW images.

        Args:
          x: images, shape ``(batch, 1, 8, 8)``.

        Returns:
          Logits, shape ``(batch, 10)``.

        Example:
          >>> TorchDigitsCNN(width=4).eval()(torch.zeros(2, 1, 8, 8)).shape
          torch.Size([2, 10])
        """
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(x.mean(dim=(2, 3)))


class TorchKD(nn.Module):
    """A SuperGradients-style KD module: ``student.*`` and ``teacher.*`` keys in one state_dict.

    Example:
      >>> sorted({k.split(".")[0] for k in TorchKD(4, 8).state_dict()})
      ['student', 'teacher']
    """

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.student = TorchDigitsCNN(student_width)
        self.teacher = TorchDigitsCNN(teacher_width)


def torch_logits(model: nn.Module, images_nhwc: np.ndarray) -> np.ndarray:
    """Eval-mode logits of ``model`` for NHWC float32 images.

    Args:
      model: a :class:`TorchDigitsCNN` with loaded weights.
      images_nhwc: ``(n, 8, 8, 1)`` float32 images.

    Returns:
      ``(n, 10)`` float32 logits.

    Example:
      >>> torch_logits(TorchDigitsCNN(4), np.zeros((3, 8, 8, 1), np.float32)).shape
      (3, 10)
    """
    model.eval()
    with torch.no_grad():
        return model(torch.from_numpy(images_nhwc.transpose(0, 3, 1, 2).copy())).numpy()
