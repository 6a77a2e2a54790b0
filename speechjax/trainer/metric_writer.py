"""Where training numbers go: W/metrics.jsonl, TensorBoard (tensorboardX, no
TensorFlow), and optionally Weights & Biases. Only process 0 writes."""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
from typing import Any

import jax
import numpy as np

log = logging.getLogger(__name__)


def _plain(value: Any):
  value = np.asarray(jax.device_get(value)).item() if np.ndim(value) == 0 else value
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN; keep it visible rather than dropping it
  return value


WANDB_MODES = ("online", "offline", "disabled")
WANDB_ID_FILE = "wandb_run_id"


def _start_wandb(workdir: str, wandb_cfg, config_dict):
  """A W&B run for this run folder, or None when wandb is not installed.

  The run id is kept in W/wandb_run_id, so a resumed training logs into the same
  W&B run. Its files go under $WANDB_DIR when set, else under the run folder.
  Offline runs are uploaded later with `wandb sync`."""
  mode = wandb_cfg.get("mode", "offline")
  if mode not in WANDB_MODES:
    raise ValueError(f"logging.wandb.mode={mode!r}; valid: {', '.join(WANDB_MODES)}")
  try:
    import wandb
  except ImportError:
    log.warning("logging.wandb.enabled is set but wandb is not installed "
                "(pip install 'speechjax[wandb]'); logging without W&B")
    return None
  id_path = os.path.join(workdir, WANDB_ID_FILE)
  if os.path.exists(id_path):
    with open(id_path) as f:
      run_id = f.read().strip()
  else:
    run_id = secrets.token_hex(4)  # W&B ids: letters and digits
    with open(id_path, "w") as f:
      f.write(run_id + "\n")
  return wandb.init(project=wandb_cfg.project, mode=mode, dir=os.environ.get("WANDB_DIR") or workdir,
                    config=config_dict, id=run_id, resume="allow",
                    name=os.path.basename(os.path.abspath(workdir)))


class MetricWriter:

  def __init__(self, workdir: str, *, tensorboard: bool = True, wandb_cfg=None, config_dict=None):
    self.enabled = jax.process_index() == 0
    self._jsonl = None
    self._tb = None
    self._wandb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", buffering=1)
    if tensorboard:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, "tb"))
    if wandb_cfg is not None and wandb_cfg.enabled:
      self._wandb = _start_wandb(workdir, wandb_cfg, config_dict)

  def write(self, step: int, split: str, metrics: dict[str, Any]) -> None:
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, **{k: _plain(v) for k, v in metrics.items()}}
    self._jsonl.write(json.dumps(record) + "\n")
    numeric = {k: v for k, v in record.items() if k not in ("step", "split")
               and isinstance(v, (int, float)) and not isinstance(v, bool)}
    if self._tb is not None:
      for k, v in numeric.items():
        self._tb.add_scalar(f"{split}/{k}", v, step)
    if self._wandb is not None:
      self._wandb.log({f"{split}/{k}": v for k, v in numeric.items()}, step=int(step))

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()

  def close(self) -> None:
    if not self.enabled:
      return
    self._jsonl.close()
    if self._tb is not None:
      self._tb.close()
    if self._wandb is not None:
      self._wandb.finish()
