"""The training loop: build, restore, compile, train, evaluate, checkpoint.

If there is already a checkpoint under `workdir/checkpoints`, training resumes
from it, including the data iterator, so the resumed run sees exactly the
batches it would have seen; a config that changes what is trained is refused
(speechjax.trainer.config_record). SIGTERM / SIGINT on any process stops every
process at the same step with one complete checkpoint; a run of non-finite
steps longer than `train.max_bad_steps` stops the run, at most one step late.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import signal
import time

import flax.linen as nn
import jax
import numpy as np
import tqdm

from speechjax import parallel
from speechjax.trainer import checkpoint as ckpt_lib
from speechjax.trainer import config_record, optim, partition
from speechjax.trainer import step as step_lib
from speechjax.trainer.metric_writer import MetricWriter
from speechjax.trainer.stopping import (
  NonFiniteGuard,
  NonFiniteLossError,  # noqa: F401  (raised by run(); callers catch it from here)
  Preemption,
  StopAgreement,
)

log = logging.getLogger(__name__)


class EarlyStopping:
  """Stops when `metric` has not improved for `patience` evaluations."""

  def __init__(self, metric: str, mode: str, patience: int, state: dict | None = None):
    if mode not in ("min", "max"):
      raise ValueError(f"eval.mode={mode!r}; valid: min, max")
    self.metric, self.mode, self.patience = metric, mode, patience
    state = state or {}
    best = state.get("best")
    self.best = best if best is not None and math.isfinite(best) else None
    self.bad_evals = state.get("bad_evals", 0)

  def update(self, metrics: dict) -> bool:
    """Records an evaluation; returns True when it is the best so far."""
    if self.metric not in metrics:
      raise KeyError(f"eval.metric={self.metric!r} not among the eval metrics {sorted(metrics)}")
    value = float(metrics[self.metric])
    if not math.isfinite(value):
      # A NaN compares false with everything: taken as a best it would never be
      # beaten. It counts as an evaluation without improvement.
      log.warning("dev %s is %s: not an improvement", self.metric, value)
      self.bad_evals += 1
      return False
    better = self.best is None or (value < self.best if self.mode == "min" else value > self.best)
    if better:
      self.best, self.bad_evals = value, 0
    else:
      self.bad_evals += 1
    return better

  @property
  def should_stop(self) -> bool:
    return self.patience > 0 and self.bad_evals >= self.patience

  def state(self) -> dict:
    return {"best": self.best, "bad_evals": self.bad_evals}


class _mesh_context:
  def __init__(self, mesh, rules):
    self._mesh = jax.set_mesh(mesh)
    self._rules = nn.logical_axis_rules(rules)

  def __enter__(self):
    self._mesh.__enter__()
    self._rules.__enter__()

  def __exit__(self, *exc):
    self._rules.__exit__(*exc)
    self._mesh.__exit__(*exc)


def _count_bytes(tree) -> int:
  return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree))


class Trainer:
  """Holds what one run needs; `run()` is the loop. Kept as an object so tests
  and the demo can build one, step it, and inspect it.

  `bundle` is the model (speechjax.model_builder.build(config)) and `data` what
  it trains on (speechjax.data.run_data.build_run_data(config, bundle)); the
  entry point builds both (speechjax.train.build_trainer)."""

  def __init__(self, config, workdir: str, *, bundle, data):
    if bundle is None or data is None:
      raise ValueError("Trainer needs the model bundle and the run data: build them with "
                       "speechjax.train.build_trainer(config, workdir)")
    _refuse_float16(config)
    self.config = config
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.mesh = parallel.mesh_from_config(config.mesh)
    self.rules = tuple(tuple(r) if isinstance(r, (list, tuple)) else r for r in config.mesh.rules)
    self.bundle = bundle
    self.data = data
    self.checkpoints = ckpt_lib.Checkpoints(workdir, config.checkpoint.keep, config.checkpoint.async_save)
    try:
      self._check_config_against_checkpoint()
      self._build_state()
    except BaseException:
      self.checkpoints.close()
      raise
    self._record_start()

  def _check_config_against_checkpoint(self) -> None:
    """Before anything is restored: a changed model would otherwise fail deep
    inside orbax with a shape error, and a changed optimizer or data would
    resume silently into another experiment."""
    from speechjax.config_base import base_config, to_json

    latest = self.checkpoints.latest_step()
    if latest is None:
      return
    config_record.check_resume(self.workdir, json.loads(to_json(self.config)), latest,
                               self.config.get("resume_policy", "strict"),
                               defaults=json.loads(to_json(base_config())))

  def _record_start(self) -> None:
    """Writes this start's config (config.<step>.json, config.json) once every
    process has compared its config with the older records."""
    from speechjax import runtime

    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices("speechjax_config_checked")
    runtime.write_config(self.config, self.workdir, step=self.step)

  def close(self) -> None:
    """Waits for in-flight checkpoint saves and stops their threads (run() does
    this when it returns or raises)."""
    self.checkpoints.close()

  # -------------------------------------------------------------- set-up
  def _build_state(self):
    cfg = self.config
    bundle = self.bundle
    rng = jax.random.PRNGKey(cfg.seed)
    init_rng, state_rng = jax.random.split(rng)

    # Trained weights (and the optimizer state) live in float32, frozen ones in
    # their storage dtype, decided before anything is read from a checkpoint.
    selection = partition.trainable_patterns(cfg.train, bundle.num_decoder_layers)
    abstract = nn.unbox(bundle.abstract_variables())
    dtypes = partition.storage_dtypes(abstract, selection, cfg.model.frozen_dtype)
    variables, _ = bundle.init_variables(init_rng, self.mesh, self.rules, dtypes)
    trainable, self.frozen = partition.split_variables(variables, selection)
    self.update_mask = partition.update_mask(selection, trainable)

    self.optimizer, self.schedule = optim.make_optimizer(cfg.optim, cfg.train.num_steps)
    trainable_shardings = jax.tree_util.tree_map(lambda x: x.sharding, trainable)
    abstract_opt = jax.eval_shape(self.optimizer.init, trainable)
    opt_shardings = parallel.shardings_like(abstract_opt, parallel.path_shardings(trainable_shardings),
                                            self.mesh)
    repl = parallel.replicated(self.mesh)
    self.state_shardings = {
        "step": repl, "trainable": trainable_shardings, "opt_state": opt_shardings,
        "rng": repl, "skipped": repl, "bad_in_a_row": repl,
    }
    # Donated: the state takes over the weights' buffers instead of holding a second copy.
    self.state = jax.jit(lambda t, r: step_lib.init_train_state(t, self.optimizer, r),
                         out_shardings=self.state_shardings, donate_argnums=(0,))(trainable, state_rng)
    del variables, trainable
    self.frozen_shardings = jax.tree_util.tree_map(lambda x: x.sharding, self.frozen)

    train_step = step_lib.make_train_step(bundle.objective, self.optimizer, self.schedule, cfg.train,
                                          self.update_mask)
    self.train_step = jax.jit(
        train_step, in_shardings=(self.state_shardings, self.frozen_shardings, None),
        out_shardings=(self.state_shardings, None), donate_argnums=(0,),
        compiler_options=step_lib.compiler_options(self.mesh.devices.flat))
    self.eval_step = jax.jit(step_lib.make_eval_step(bundle.objective),
                             in_shardings=(trainable_shardings, self.frozen_shardings, None))

    self.meta = {}
    if self.checkpoints.latest_step() is not None:
      self.state, self.meta = self.checkpoints.restore(self.state)
      if self.meta.get("data_state") is not None:
        self.data.train.set_state(self.meta["data_state"])
    log.info("trainable: %d params (%.1f MB), frozen: %d params (%.1f MB), optimizer state %.1f MB",
             sum(x.size for x in jax.tree_util.tree_leaves(self.state["trainable"])),
             _count_bytes(self.state["trainable"]) / 1e6,
             sum(x.size for x in jax.tree_util.tree_leaves(self.frozen)),
             _count_bytes(self.frozen) / 1e6, _count_bytes(self.state["opt_state"]) / 1e6)

  def _context(self):
    """Mesh and logical-axis rules for activation sharding constraints."""
    return _mesh_context(self.mesh, self.rules)

  @property
  def step(self) -> int:
    return int(jax.device_get(self.state["step"]))

  def compile(self, batch: dict) -> None:
    """Ahead-of-time compile of the step for this batch shape, logging its
    memory use (what would OOM shows here, before any data is read)."""
    start = time.time()
    # Lower for the global batch (every process's rows), as the step will run.
    global_batch = jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
        parallel.shard_batch(batch, self.mesh, self.rules))
    with self._context():
      compiled = self.train_step.lower(self.state, self.frozen, global_batch).compile()
    self.compile_seconds = time.time() - start
    analysis = compiled.memory_analysis()
    msg = f"train step compiled in {self.compile_seconds:.1f}s"
    if analysis is not None:
      msg += (f"; memory: arguments {analysis.argument_size_in_bytes / 1e6:.1f} MB, outputs "
              f"{analysis.output_size_in_bytes / 1e6:.1f} MB, temporaries "
              f"{analysis.temp_size_in_bytes / 1e6:.1f} MB")
    log.info(msg)
    self.memory_analysis = analysis

  def train_one(self, batch: dict) -> dict:
    global_batch = parallel.shard_batch(batch, self.mesh, self.rules)
    with self._context():
      self.state, metrics = self.train_step(self.state, self.frozen, global_batch)
    return metrics

  def variables(self) -> dict:
    return partition.join_variables(self.state["trainable"], self.frozen)

  # ---------------------------------------------------------- evaluation
  def evaluate_loss(self, batches) -> dict:
    totals: dict[str, float] = {}
    for batch in batches:
      global_batch = parallel.shard_batch(batch, self.mesh, self.rules)
      with self._context():
        stats = jax.device_get(self.eval_step(self.state["trainable"], self.frozen, global_batch))
      for k, v in stats.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return _rates(totals)

  def evaluate(self) -> dict:
    cfg = self.config.eval
    metrics = self.evaluate_loss(self.data.dev_batches(cfg.max_batches))
    if cfg.task_metrics:
      from speechjax.evaluation import scoring
      # Several hosts decode their own rows over the whole mesh (evaluation/hosts.py).
      context = self._context() if jax.process_count() > 1 else contextlib.nullcontext()
      with context:
        metrics.update(scoring.dev_metrics(self.bundle, self.variables(), self.data, self.config))
    return metrics

  # ---------------------------------------------------------------- loop
  def run(self) -> dict:
    cfg = self.config
    writer = MetricWriter(self.workdir, tensorboard=cfg.logging.tensorboard,
                          wandb_cfg=cfg.logging.wandb, config_dict=cfg.to_dict())
    stopper = EarlyStopping(cfg.eval.metric, cfg.eval.mode, cfg.eval.patience,
                            self.meta.get("early_stopping"))
    start_step = self.step
    total = cfg.train.num_steps
    bar = tqdm.tqdm(total=total, initial=start_step, disable=not (self.is_main and cfg.logging.progress_bar),
                    dynamic_ncols=True, desc="train")
    pending: list[dict] = []
    window_start, window_audio, window_tokens, window_steps = time.time(), 0.0, 0.0, 0
    last_eval: dict = {}
    stopped_by = "num_steps"
    first = True

    guard = NonFiniteGuard(cfg.train.max_bad_steps, int(jax.device_get(self.state["bad_in_a_row"])),
                            self.workdir)
    agreement = StopAgreement(self.mesh)

    def save(best=False, force=False):
      guard.check(lag=0)  # the state about to be saved; saving waits for it anyway
      if not force and guard.bad_in_a_row:
        return  # never replace the last good checkpoint during a run of bad steps
      meta = {"data_state": self.data.train.get_state(), "early_stopping": stopper.state(),
              "last_eval": last_eval}
      _maybe_kill_during_save(step, self.checkpoints)
      self.checkpoints.save(self.state, meta, best=best)
      _maybe_inject_fault(step, self.checkpoints)

    try:
      with Preemption() as preemption:
        step = start_step
        while step < total:
          batch = next(self.data.train)
          if first:
            self.compile(batch)
            first = False
          metrics = self.train_one(batch)
          step += 1
          pending.append(metrics)
          guard.add(step, metrics)
          window_audio += float(np.sum(batch.get("audio_seconds", 0.0)))
          window_tokens += float(np.sum(batch["attention_mask"]))
          window_steps += 1
          bar.update(1)

          if step % cfg.logging.every_steps == 0 or step == total:
            logged = _mean_metrics(jax.device_get(pending))
            pending = []
            elapsed = max(time.time() - window_start, 1e-9)
            logged.update(steps_per_sec=window_steps / elapsed, audio_sec_per_sec=window_audio / elapsed,
                          tokens_per_sec=window_tokens / elapsed, **self.data.train_stats())
            writer.write(step, "train", logged)
            bar.set_postfix(loss=f"{logged['loss']:.3f}", lr=f"{logged['lr']:.2e}",
                            steps_s=f"{logged['steps_per_sec']:.2f}",
                            audio_s_s=f"{logged['audio_sec_per_sec']:.0f}", refresh=False)
            window_start, window_audio, window_tokens, window_steps = time.time(), 0.0, 0.0, 0
            guard.check(lag=0)  # fetched already: decide on this step
          else:
            guard.check(lag=1)  # the previous step, finished or nearly: no stall

          is_best = False
          if cfg.eval.every_steps and (step % cfg.eval.every_steps == 0 or step == total):
            last_eval = self.evaluate()
            is_best = stopper.update(last_eval)
            writer.write(step, "dev", {**last_eval, "best_" + cfg.eval.metric: stopper.best})
            log.info("step %d dev: %s", step, json.dumps(last_eval, default=float))

          if is_best or step % cfg.checkpoint.every_steps == 0 or step == total:
            save(best=is_best)
          if agreement.should_stop(preemption.requested):
            save(force=True)
            stopped_by = "signal"
            log.warning("stopped at step %d by a signal; the checkpoint of step %d is complete",
                        step, step)
            break
          if stopper.should_stop:
            save()
            stopped_by = "early_stopping"
            break
    finally:
      bar.close()
      self.close()  # every in-flight save completes before the run returns or raises
      writer.flush()
      writer.close()
    summary = {"final_step": self.step, "stopped_by": stopped_by, "best": stopper.best,
               "skipped_steps": int(jax.device_get(self.state["skipped"])), "last_eval": last_eval}
    if self.is_main:
      log.info("training finished: %s", json.dumps(summary, default=float))
    return summary


def _maybe_inject_fault(step: int, checkpoints) -> None:
  """Test hook: SPEECHJAX_KILL_AFTER_CHECKPOINT=N hard-kills this process
  (SIGKILL, no clean-up) right after the checkpoint of step N is on disk, so
  tests can check that a resumed run continues exactly."""
  after = os.environ.get("SPEECHJAX_KILL_AFTER_CHECKPOINT")
  if after and int(after) == step:
    checkpoints.wait()
    os.kill(os.getpid(), signal.SIGKILL)


def _maybe_kill_during_save(step: int, checkpoints) -> None:
  """Test hook: SPEECHJAX_KILL_DURING_CHECKPOINT=N hard-kills this process while
  the checkpoint of step N is being written: a watcher thread sends SIGKILL as
  soon as orbax's temporary folder for step N exists (inside a synchronous save,
  or while an async save writes in the background)."""
  during = os.environ.get("SPEECHJAX_KILL_DURING_CHECKPOINT")
  if not during or int(during) != step:
    return
  import threading

  folder = checkpoints.last.directory

  def kill_when_writing():
    while True:
      names = os.listdir(folder) if os.path.isdir(folder) else []
      if any(name.startswith(f"{step}.") and "tmp" in name for name in names):
        os.kill(os.getpid(), signal.SIGKILL)
      time.sleep(0.0005)

  threading.Thread(target=kill_when_writing, daemon=True).start()


def _refuse_float16(config) -> None:
  if str(config.model.dtype) == "float16":
    raise ValueError(
        "model.dtype='float16' is not supported: float16 overflows to inf in activations and "
        "gradients without loss scaling, which this trainer does not do. Use "
        "model.dtype='bfloat16' (the same memory and speed, with float32's range).")


def _mean_metrics(history: list[dict]) -> dict:
  """Averages per-step metrics; summed stats become rates over the window."""
  sums: dict[str, float] = {}
  for m in history:
    for k, v in m.items():
      sums[k] = sums.get(k, 0.0) + float(v)
  n = max(len(history), 1)
  out = {k: sums[k] / n for k in ("loss", "grad_norm", "lr", "adv_loss") if k in sums}
  out["skipped_steps"] = n - sums.get("finite", n)
  out.update({k: v for k, v in _rates(sums).items() if k not in out})
  return out


def _rates(totals: dict) -> dict:
  """Summed statistics -> per-token / per-example averages."""
  out = {}
  if "lm_loss_sum" in totals:
    out["loss"] = totals["lm_loss_sum"] / max(totals["tokens"], 1.0)
    out["token_accuracy"] = totals["correct_tokens"] / max(totals["tokens"], 1.0)
  if "cls_loss_sum" in totals:
    out["cls_loss"] = totals["cls_loss_sum"] / max(totals["labelled"], 1.0)
    out["head_accuracy"] = totals["correct_labels"] / max(totals["labelled"], 1.0)
  if "ctc_loss_sum" in totals:
    out["ctc_loss"] = totals["ctc_loss_sum"] / max(totals["tokens"], 1.0)
    out.setdefault("loss", out["ctc_loss"])
  return out
