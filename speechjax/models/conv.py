"""1-D convolution with explicit padding and logical axes, for audio front ends
(Whisper's conv stem, conv projectors, wav2vec2-style feature extractors)."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp


class Conv1d(nn.Module):
  """1-D convolution with explicit (low, high) padding; kernel [k, in, out].

  `in_layout` 'NCW' reads channels-first input (mel features [B, n_mels, F])
  without a separate transpose; the output is always [B, W, out].
  """

  features: int
  kernel_size: int
  stride: int = 1
  padding: tuple[int, int] = (0, 0)
  in_layout: str = "NWC"
  kernel_axes: tuple[str | None, str | None, str | None] = ("conv_kernel", None, "embed")
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    in_features = x.shape[1] if self.in_layout == "NCW" else x.shape[-1]
    kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(
            nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal"), self.kernel_axes),
        (self.kernel_size, in_features, self.features), self.param_dtype)
    bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), (self.kernel_axes[2],)),
        (self.features,), self.param_dtype)
    y = jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), window_strides=(self.stride,),
        padding=[self.padding], dimension_numbers=(self.in_layout, "WIO", "NWC"))
    return y + bias.astype(self.dtype)
