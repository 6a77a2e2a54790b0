"""Training-time masking of encoder states in the CTC adapter (time masks and
state-channel dropout): where it masks, how much, and that evaluation and a
config without it see the states untouched."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from speechjax.models.ctc_adapter import CTCAdapter, CTCAdapterConfig, time_mask
from speechjax.models.projector import ProjectorConfig


def _valid(lengths, n):
  return jnp.asarray(np.arange(n)[None] < np.asarray(lengths)[:, None])


def test_time_masks_stay_inside_valid_frames_and_within_their_width():
  n, lengths = 40, [40, 25, 10, 3]
  valid = _valid(lengths, n)
  hit = np.zeros((len(lengths), n), bool)
  for seed in range(200):
    keep = np.asarray(time_mask(jax.random.key(seed), valid, num_masks=2, max_width=4, max_fraction=0.2))
    masked = ~keep
    assert not (masked & ~np.asarray(valid)).any(), "a padding frame was masked"
    for row, length in enumerate(lengths):
      widest = min(4, int(0.2 * length))
      assert masked[row].sum() <= 2 * widest, (row, masked[row].sum())
    hit |= masked
  # Over many draws the spans reach the start and the end of each long row,
  # and a 3-frame row (0.2 * 3 < 1) is never masked.
  assert hit[0, 0] and hit[0, 39] and hit[1, 0] and hit[1, 24] and hit[2, :10].any()
  assert not hit[3].any()


def test_time_mask_widths_cover_zero_to_the_bound():
  valid = _valid([100] * 512, 100)
  keep = np.asarray(time_mask(jax.random.key(0), valid, num_masks=1, max_width=5, max_fraction=1.0))
  widths = set((~keep).sum(-1).tolist())
  assert widths == {0, 1, 2, 3, 4, 5}


def _states(b=4, n=12, d=6):
  x = jnp.asarray(np.random.default_rng(0).standard_normal((b, n, d)).astype(np.float32)) + 3.0
  return x, _valid([12, 9, 12, 5], n)


def test_adapter_masks_whole_frames_and_whole_channels_only_in_training():
  cfg = CTCAdapterConfig(layers=0, frame_stack=1, time_masks=2, time_mask_frames=3,
                         time_mask_max_fraction=0.5, state_dropout=0.3)
  assert cfg.enabled and cfg.masks_states
  x, mask = _states()
  model = CTCAdapter(cfg)
  variables = model.init(jax.random.key(0), x, mask)
  same, _ = model.apply(variables, x, mask, deterministic=True)
  np.testing.assert_array_equal(np.asarray(same), np.asarray(x))
  dropped_channels = kept_scaled = masked_frames = 0
  for seed in range(20):
    out, out_mask = model.apply(variables, x, mask, deterministic=False, rngs={"dropout": jax.random.key(seed)})
    out, xs = np.asarray(out), np.asarray(x)
    np.testing.assert_array_equal(np.asarray(out_mask), np.asarray(mask))
    zero = out == 0
    frame_zero = zero.all(-1)  # [B, N]: a time mask zeroes every channel of a frame
    channel_zero = zero.all(1)  # [B, D]: state dropout zeroes a channel at every frame
    live = ~frame_zero[..., None] & ~channel_zero[:, None, :]
    np.testing.assert_allclose(out[live], (xs / 0.7)[live], rtol=1e-6)
    assert not (frame_zero & ~np.asarray(mask)).any()
    masked_frames += frame_zero.sum()
    dropped_channels += channel_zero.sum()
    kept_scaled += live.any()
  assert masked_frames > 0 and dropped_channels > 0 and kept_scaled == 20
  # About 30 % of 4 x 6 channels per draw.
  assert 0.15 < dropped_channels / (20 * 4 * 6) < 0.45


def test_masking_adds_no_parameters_and_a_config_without_it_is_unchanged():
  x, mask = _states()
  plain = CTCAdapter(CTCAdapterConfig(layers=1, dim=8, heads=2, ffn_dim=16, frame_stack=2))
  masked = CTCAdapter(CTCAdapterConfig(layers=1, dim=8, heads=2, ffn_dim=16, frame_stack=2, time_masks=1,
                                       state_dropout=0.1))
  variables = plain.init(jax.random.key(1), x, mask)
  assert jax.tree.structure(variables) == jax.tree.structure(masked.init(jax.random.key(1), x, mask))
  a, _ = plain.apply(variables, x, mask, deterministic=True)
  b, _ = masked.apply(variables, x, mask, deterministic=True)
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Without masks, training mode with dropout 0 is the evaluation output too.
  c, _ = plain.apply(variables, x, mask, deterministic=False, rngs={"dropout": jax.random.key(2)})
  np.testing.assert_array_equal(np.asarray(a), np.asarray(c))


def test_projector_config_hands_the_masks_to_the_adapter():
  adapter = ProjectorConfig(kind="ctc_compress", ctc_time_masks=2, ctc_time_mask_frames=3,
                            ctc_state_dropout=0.1).ctc_adapter()
  assert (adapter.time_masks, adapter.time_mask_frames, adapter.state_dropout) == (2, 3, 0.1)


@pytest.mark.parametrize("bad", [dict(time_masks=-1), dict(time_mask_frames=0),
                                 dict(time_mask_max_fraction=1.5), dict(state_dropout=1.0)])
def test_bad_masking_values_are_refused_by_name(bad):
  with pytest.raises(ValueError, match=next(iter(bad))):
    CTCAdapterConfig(**bad)
