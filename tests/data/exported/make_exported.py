"""Models exported by PyTorch's own ONNX exporter (not written with onnx.helper), for the static shape engine.

    python tests/data/exported/make_exported.py      # needs torch (pip install torch==2.13.0), not a dependency

Written with torch 2.13.0 (CPU build), the TorchScript exporter (``dynamo=False``), opset 17, fixed seeds:

- ``reflect_pad_audio.onnx``: audio [1, 1, T] → ``F.pad(x, (2, 2), "reflect")`` → Conv1d 1→8 k5 → an ``if`` on
  the conv output's length (> 4000: Conv1d 8→8 k3, scripted, so an If node). The pads are computed by the
  chain Constant → ConstantOfShape/Concat → Reshape → Slice(step −1) → Transpose → Reshape → Cast → Pad.
- ``reflect_pad_image.onnx``: image [1, 3, H, W] → ReflectionPad2d(3) → Conv 3→8 k7 → ReLU →
  ReflectionPad2d(1) → Conv 8→8 k3 s2 (a CycleGAN-style generator's stem), traced.
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent


class Audio(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 8, 5)
        self.conv2 = nn.Conv1d(8, 8, 3, padding=1)

    def forward(self, x):
        x = F.pad(x, (2, 2), mode="reflect")
        y = self.conv(x)
        if y.shape[-1] > 4000:
            y = self.conv2(y)
        return y


def main() -> None:
    torch.manual_seed(0)
    torch.onnx.export(torch.jit.script(Audio().eval()), (torch.randn(1, 1, 16000),), HERE / "reflect_pad_audio.onnx",
                      dynamo=False, input_names=["audio"], output_names=["y"], dynamic_axes={"audio": {2: "T"}},
                      opset_version=17)
    torch.manual_seed(1)
    image = nn.Sequential(nn.ReflectionPad2d(3), nn.Conv2d(3, 8, 7), nn.ReLU(), nn.ReflectionPad2d(1),
                          nn.Conv2d(8, 8, 3, stride=2)).eval()
    torch.onnx.export(image, (torch.randn(1, 3, 64, 64),), HERE / "reflect_pad_image.onnx", dynamo=False,
                      input_names=["image"], output_names=["y"], dynamic_axes={"image": {2: "H", 3: "W"}},
                      opset_version=17)


if __name__ == "__main__":
    main()
