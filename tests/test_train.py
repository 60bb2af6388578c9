"""The train step and the training loop: equivalence, learning, resume, errors."""
import glob
import json
import os
import re
import signal
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mnist
from scoreflow_jax import checkpointing, data, generate, model as model_lib, run_config
from scoreflow_jax import trainer
from scoreflow_jax import train_step as ts


def tiny_config(**training):
  config = mnist.get_config("tiny")
  config.training.image_every = 0
  for k, v in training.items():
    config.training[k] = v
  return config


def _setup(config, n):
  model = model_lib.build_model(config)
  tx, schedule = ts.make_optimizer(config.optim, 100)
  images, labels = data.make_synthetic(64)
  batch = data.to_model_batch(images[:16], labels[:16])
  state = ts.create_train_state(model, tx, jax.random.key(0), batch)
  mesh = ts.make_mesh(jax.devices()[:n])
  step = ts.make_train_step(model, tx, schedule, mesh, 0.99)
  return model, tx, batch, ts.replicate(state, mesh), mesh, step


def test_same_result_on_1_2_4_devices():
  assert jax.device_count() >= 4
  config = tiny_config()
  results = {}
  for n in (1, 2, 4):
    _, _, batch, state, mesh, step = _setup(config, n)
    losses = []
    for _ in range(3):
      state, metrics = step(state, ts.global_batch(batch, mesh))
      losses.append(float(metrics["loss"]))
    results[n] = (jax.device_get(state.params), jax.device_get(state.ema_params), losses)
  for n in (2, 4):
    chex.assert_trees_all_close(results[n][0], results[1][0], rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(results[n][1], results[1][1], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(results[n][2], results[1][2], rtol=1e-5)
  assert results[1][2][0] != results[1][2][1]  # the parameters did move


def test_step_matches_direct_gradient():
  """Loss, gradient norm and the AdamW update equal a direct single-device computation."""
  config = tiny_config()
  model, tx, batch, state, mesh, step = _setup(config, 4)
  params0 = jax.device_get(state.params)
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(16))
  loss_fn = lambda p: jnp.mean(model.per_sample_loss(p, batch, keys)[0])
  loss, grads = jax.jit(jax.value_and_grad(loss_fn))(params0)  # jitted: op by op is slow
  per_sample, sigma = (np.asarray(a) for a in jax.jit(model.per_sample_loss)(
      params0, batch, keys))
  updates, _ = tx.update(grads, tx.init(params0), params0)
  expected = optax.apply_updates(params0, updates)
  new_state, metrics = step(state, ts.global_batch(batch, mesh))
  np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-4)
  chex.assert_trees_all_close(jax.device_get(new_state.params), expected, rtol=1e-5, atol=1e-7)
  # the per-sigma-bin losses behind train/loss_sigma_*: each sample in its sigma's bin
  bins = np.searchsorted(np.asarray(ts.SIGMA_BINS), sigma, side="right")
  counts = np.bincount(bins, minlength=len(ts.SIGMA_BINS))
  sums = np.bincount(bins, weights=per_sample, minlength=len(ts.SIGMA_BINS))
  assert counts.sum() == 16 and np.count_nonzero(counts) >= 2  # more than one bin used
  np.testing.assert_array_equal(metrics["loss_bin_count"], counts)
  np.testing.assert_allclose(metrics["loss_bin_sum"], sums, rtol=1e-5, atol=1e-6)
  assert int(new_state.step) == 1 and int(new_state.ema_num_updates) == 1
  # the EMA takes the updated parameters: LitEma's first decay is (1 + 1) / (10 + 1)
  assert config.ema.decay > 2 / 11
  chex.assert_trees_all_close(
      jax.device_get(new_state.ema_params),
      jax.tree.map(lambda p0, p1: p0 + (1 - 2 / 11) * (p1 - p0), params0, expected),
      rtol=1e-5, atol=1e-7)


def test_step_with_the_nll_term_logs_it_apart_from_the_loss():
  # loss.nll_weight > 0 (density models): the step descends the denoising
  # loss plus w * bits/dim, logs "loss" (the denoising part, comparable with
  # other runs, and the only part in the sigma bins) and "bits_per_dim"; on 2
  # devices as on one computation.
  from configs import mnist_density
  config = mnist_density.get_config("tiny")
  config.loss.nll_weight = 0.5
  model, tx, batch, state, mesh, step = _setup(config, 2)
  params0 = jax.device_get(state.params)
  step_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), 0)
  keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(16))
  total, _, parts = jax.jit(lambda p: model.per_sample_loss(p, batch, keys, terms=True))(params0)
  np.testing.assert_allclose(total, parts["diffusion"] + 0.5 * parts["bits_per_dim"], rtol=1e-6)
  grads = jax.jit(jax.grad(lambda p: jnp.mean(model.per_sample_loss(p, batch, keys)[0])))(params0)
  updates, _ = tx.update(grads, tx.init(params0), params0)
  new_state, metrics = step(state, ts.global_batch(batch, mesh))
  np.testing.assert_allclose(metrics["loss"], np.mean(parts["diffusion"]), rtol=1e-5)
  np.testing.assert_allclose(metrics["bits_per_dim"], np.mean(parts["bits_per_dim"]), rtol=1e-5)
  assert float(metrics["bits_per_dim"]) > 1.0  # about 8 at the start, not a zero term
  np.testing.assert_allclose(np.sum(metrics["loss_bin_sum"]), np.sum(parts["diffusion"]), rtol=1e-5)
  chex.assert_trees_all_close(jax.device_get(new_state.params),
                              optax.apply_updates(params0, updates), rtol=1e-5, atol=1e-6)
  out, finite = trainer._summarize([metrics])
  assert finite and out["train/bits_per_dim"] == pytest.approx(float(metrics["bits_per_dim"]))
  # without the term, no such metric
  _, _, pbatch, pstate, pmesh, pstep = _setup(tiny_config(), 1)
  plain_metrics = pstep(pstate, ts.global_batch(pbatch, pmesh))[1]
  assert "bits_per_dim" not in plain_metrics
  assert "train/bits_per_dim" not in trainer._summarize([plain_metrics])[0]


def _losses(workdir):
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows}


def test_initial_state_is_the_eager_init_bit_for_bit():
  # create_train_state is jitted for speed; the values are those of the plain
  # op-by-op model.init, so runs started before it was jitted reproduce.
  config = tiny_config()
  model = model_lib.build_model(config)
  tx, _ = ts.make_optimizer(config.optim, 100)
  images, labels = data.make_synthetic(4)
  batch = data.to_model_batch(images, labels)
  state = ts.create_train_state(model, tx, jax.random.key(3), batch, (0.05,))
  k_init, k_train = jax.random.split(jax.random.key(3))
  eager = model.init(k_init, batch)
  chex.assert_trees_all_equal(state.params, eager)
  chex.assert_trees_all_equal(state.ema_params, eager)
  chex.assert_trees_all_equal(state.phema_params, (eager,))
  np.testing.assert_array_equal(state.rng, jax.random.key_data(k_train))
  assert int(state.step) == 0 and int(state.ema_num_updates) == 0


def test_tiny_training_learns(tmp_path, monkeypatch):
  config = tiny_config(num_steps=100, log_every=10, checkpoint_every=100, image_every=50)
  made = []  # the grids' sampler is made (and compiled) once per run, not per grid
  make = generate.make_sampler_fn
  monkeypatch.setattr(generate, "make_sampler_fn", lambda *a, **k: made.append(1) or make(*a, **k))
  out = trainer.train_and_evaluate(config, str(tmp_path / "run"), log=lambda s: None)
  losses = _losses(out["workdir"])
  assert out["step"] == 100
  assert losses[100] < 0.5 * losses[10], losses
  assert len(made) == 1
  images = os.path.join(out["workdir"], "images", "train")
  assert sorted(os.listdir(images)) == ["step_0000050.png", "step_0000100.png"]
  # the last grid is the EMA weights' grid, sampled afresh
  from PIL import Image
  fresh = trainer.sample_grid(model_lib.build_model(config),
                              ts.host(out["state"].ema_params), config, ts.make_mesh(),
                              jax.random.fold_in(jax.random.key(config.seed + 1), 100))
  np.testing.assert_array_equal(
      np.asarray(Image.open(os.path.join(images, "step_0000100.png"))), fresh[..., 0])


def test_time_limit_counts_data_loading(tmp_path, monkeypatch):
  # The limit is the run's wall clock: time spent before the first step (data
  # loading, the Gaussian base's fit, compilation) counts against it.
  load = data.load_dataset

  def slow_load(config):
    time.sleep(1.5)
    return load(config)

  monkeypatch.setattr(data, "load_dataset", slow_load)
  msgs = []
  out = trainer.train_and_evaluate(tiny_config(num_steps=20, time_limit_s=1.0),
                                   str(tmp_path / "run"), log=msgs.append)
  assert out["step"] == 0
  assert any("time limit 1 s reached at step 0" in m for m in msgs), msgs
  assert checkpointing.Checkpointer(str(tmp_path / "run" / "checkpoints"),
                                   read_only=True).latest_step() == 0
  assert not any("cosine" in m for m in msgs), msgs
  # a cosine schedule spans num_steps, not the time limit: the stop says where it was
  config = tiny_config(num_steps=20, time_limit_s=1.0)
  config.optim.update(schedule="cosine", learning_rate=1e-3, warmup_steps=0)
  msgs = []
  trainer.train_and_evaluate(config, str(tmp_path / "cos"), log=msgs.append)
  assert any("step 0; saving (the cosine schedule was at 0.001 of 0.001: it decays "
             "over training.num_steps=20)" in m for m in msgs), msgs


def _stop_on_time_after(monkeypatch, n, nonfinite_at=None):
  """The trainer's clock jumps past any time limit once ``n`` steps have run;
  the step numbered ``nonfinite_at`` (1-based) reports a non-finite loss."""
  calls = [0]
  make = ts.make_train_step

  def make_counted(*args, **kwargs):
    step_fn = make(*args, **kwargs)

    def counted(state, batch, **kwargs):
      state, metrics = step_fn(state, batch, **kwargs)
      calls[0] += 1
      if calls[0] == nonfinite_at:
        metrics = dict(metrics, finite=jnp.asarray(False))
      return state, metrics
    return counted

  monkeypatch.setattr(ts, "make_train_step", make_counted)
  monkeypatch.setattr(trainer, "_time_limit_clock",
                      lambda: time.perf_counter() + (1e6 if calls[0] >= n else 0.0))


def test_time_limit_stop_logs_checks_and_saves_the_last_steps(tmp_path, monkeypatch):
  # Stopped by the time limit between log steps: the steps since the last log
  # are written to metrics.jsonl and the loss curve, then saved; and the run
  # ends with a sample grid, as a finished one does.
  _stop_on_time_after(monkeypatch, 3)
  workdir = str(tmp_path / "run")
  msgs = []
  out = trainer.train_and_evaluate(
      tiny_config(num_steps=20, log_every=10, checkpoint_every=10, time_limit_s=3600,
                  image_every=10),
      workdir, log=msgs.append)
  assert os.listdir(os.path.join(workdir, "images", "train")) == ["step_0000003.png"]
  assert out["step"] == 3
  stop = [i for i, m in enumerate(msgs) if "time limit 3600 s reached at step 3" in m]
  assert stop and msgs[stop[0] - 1].startswith("step 3/20 | loss"), msgs
  assert list(_losses(workdir)) == [3]
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   read_only=True).steps() == [3]


def test_time_limit_at_a_grid_step_writes_no_second_grid(tmp_path, monkeypatch):
  _stop_on_time_after(monkeypatch, 4)
  workdir, msgs = str(tmp_path / "run"), []
  trainer.train_and_evaluate(
      tiny_config(num_steps=20, log_every=10, checkpoint_every=10, time_limit_s=3600,
                  image_every=2), workdir, log=msgs.append)
  assert sorted(os.listdir(os.path.join(workdir, "images", "train"))) == [
      "step_0000002.png", "step_0000004.png"]
  assert sum(m.startswith("sample grid") for m in msgs) == 2, msgs


def _signal_after_step(monkeypatch, signum, step):
  """Patches the train step to send ``signum`` to this process after its
  ``step``-th call; returns the unpatched ``make_train_step``."""
  make, calls = ts.make_train_step, [0]
  def make_signalling(*args, **kwargs):
    step_fn = make(*args, **kwargs)
    def signalling(state, batch, **kwargs):
      out = step_fn(state, batch, **kwargs)
      calls[0] += 1
      if calls[0] == step:
        os.kill(os.getpid(), signum)
      return out
    return signalling
  monkeypatch.setattr(ts, "make_train_step", make_signalling)
  return make


def test_sigterm_stops_logs_and_saves_like_the_time_limit(tmp_path, monkeypatch):
  # a cluster's preemption notice: the run saves where it is and resumes there
  make = _signal_after_step(monkeypatch, signal.SIGTERM, 3)
  before = signal.getsignal(signal.SIGTERM)
  workdir, msgs = str(tmp_path / "run"), []
  out = trainer.train_and_evaluate(tiny_config(num_steps=20, log_every=10, checkpoint_every=10,
                                               image_every=10), workdir, log=msgs.append)
  assert out["step"] == 3 and list(_losses(workdir)) == [3]
  # a preemption's grace is for the save: no grid
  assert not glob.glob(os.path.join(workdir, "images", "**", "*.png"), recursive=True)
  assert any(m.startswith("SIGTERM received: stopping at step 3; saving (resume: python "
                          "train.py --workdir") for m in msgs), msgs
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   read_only=True).steps() == [3]
  assert signal.getsignal(signal.SIGTERM) == before  # the caller's handler is back
  monkeypatch.setattr(ts, "make_train_step", make)
  assert trainer.train_and_evaluate(tiny_config(num_steps=5, log_every=10, checkpoint_every=10),
                                    workdir, log=lambda s: None)["step"] == 5


def test_ctrl_c_stops_and_saves_like_sigterm(tmp_path, monkeypatch, terminal_sigint):
  # Ctrl-C (what a user at a terminal presses) saves where the run is, as
  # SIGTERM and train_autoencoder.py do; the log line says a second one
  # stops at once, unsaved (tested with recording_signals)
  make = _signal_after_step(monkeypatch, signal.SIGINT, 3)
  handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
  workdir, msgs = str(tmp_path / "run"), []
  out = trainer.train_and_evaluate(tiny_config(num_steps=20, log_every=10,
                                               checkpoint_every=10), workdir,
                                   log=msgs.append)
  assert out["step"] == 3
  assert any(m.startswith("Ctrl-C received: stopping at step 3; saving (resume: "
                          "python train.py --workdir") and
             m.endswith("; Ctrl-C again stops at once, unsaved") for m in msgs), msgs
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   read_only=True).steps() == [3]
  assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers
  # a run started in the background from a script ignores Ctrl-C: it trains on
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  workdir = str(tmp_path / "background")
  assert trainer.train_and_evaluate(tiny_config(num_steps=5, log_every=10,
                                                checkpoint_every=10), workdir,
                                    log=lambda s: None)["step"] == 5
  assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
  monkeypatch.setattr(ts, "make_train_step", make)


def test_the_host_waits_for_the_previous_step(tmp_path, monkeypatch):
  # Asynchronous dispatch let the host queue up to log_every steps ahead of
  # the device when no time limit was set, and a SIGTERM's save then waited
  # for all of them (93 steps, over 3 minutes, on a busy CPU). Each step is
  # made slow on the device here (a chain of matmuls on its loss); when each
  # step is dispatched, at most one earlier one may still be unfinished.
  make, issued, most = ts.make_train_step, [], [0]

  @jax.jit
  def slow(metrics):
    a = jnp.eye(192) * (1.0 + 0.0 * metrics["loss"])
    a = jax.lax.fori_loop(0, 30, lambda i, a: a @ a / jnp.linalg.norm(a), a)
    return {**metrics, "loss": metrics["loss"] + 0.0 * a[0, 0]}

  def make_slow(*args, **kwargs):
    step_fn = make(*args, **kwargs)
    def step(state, batch, **kw):
      state, metrics = step_fn(state, batch, **kw)
      most[0] = max(most[0], sum(not m["loss"].is_ready() for m in issued))
      issued.append(slow(metrics))
      return state, issued[-1]
    return step
  monkeypatch.setattr(ts, "make_train_step", make_slow)
  out = trainer.train_and_evaluate(tiny_config(num_steps=20, log_every=20, checkpoint_every=20),
                                   str(tmp_path / "run"), log=lambda s: None)
  assert out["step"] == 20 and len(issued) == 20
  assert most[0] <= 1, most[0]


def test_a_signal_at_a_checkpoint_step_saves_once(tmp_path, monkeypatch):
  # the stop right after a checkpoint's save saves the same step again:
  # nothing is lost or refused, and the run resumes from it
  make = _signal_after_step(monkeypatch, signal.SIGTERM, 10)
  workdir, msgs = str(tmp_path / "run"), []
  out = trainer.train_and_evaluate(tiny_config(num_steps=20, log_every=10,
                                               checkpoint_every=10), workdir,
                                   log=msgs.append)
  assert out["step"] == 10
  assert any(m.startswith("SIGTERM received: stopping at step 10") for m in msgs), msgs
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   read_only=True).steps() == [10]
  monkeypatch.setattr(ts, "make_train_step", make)
  assert trainer.train_and_evaluate(tiny_config(num_steps=12, log_every=10,
                                                checkpoint_every=10), workdir,
                                    log=lambda s: None)["step"] == 12


def test_time_limit_stop_refuses_to_save_non_finite_steps(tmp_path, monkeypatch):
  # A non-finite step since the last log stops the run at the time limit as at
  # a log step: nothing is saved over the last good checkpoint.
  _stop_on_time_after(monkeypatch, 3, nonfinite_at=2)
  workdir = str(tmp_path / "run")
  with pytest.raises(trainer.NonFiniteError, match="between steps 0 and 3"):
    trainer.train_and_evaluate(
        tiny_config(num_steps=20, log_every=10, checkpoint_every=10, time_limit_s=3600),
        workdir, log=lambda s: None)
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   read_only=True).steps() == []


def _tensorboard_purge_steps(workdir):
  """Steps of the SessionLog START events (tensorboardX's purge_step) in a
  run's TensorBoard event files (TFRecords of Event protos)."""
  from tensorboardX.proto import event_pb2
  steps = []
  for name in sorted(os.listdir(workdir)):
    if not name.startswith("events.out.tfevents"):
      continue
    with open(os.path.join(workdir, name), "rb") as f:
      data = f.read()
    pos = 0
    while pos < len(data):
      n = int.from_bytes(data[pos:pos + 8], "little")
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 16 + n  # length, its crc, the record, its crc
      if event.HasField("session_log") and event.session_log.status == 1:  # START
        steps.append(event.step)
  return steps


def test_resume_continues_exactly(tmp_path):
  quiet = lambda s: None
  full = trainer.train_and_evaluate(
      tiny_config(num_steps=20, log_every=1, checkpoint_every=10), str(tmp_path / "a"), log=quiet)
  part = str(tmp_path / "b")
  trainer.train_and_evaluate(tiny_config(num_steps=10, log_every=1, checkpoint_every=10), part, log=quiet)
  msgs = []
  trainer.train_and_evaluate(tiny_config(num_steps=20, log_every=1, checkpoint_every=10), part, log=msgs.append)
  assert any("resumed" in m and "step 10" in m for m in msgs)
  assert not any("warning" in m for m in msgs), msgs  # a constant rate: more steps change nothing
  a, b = _losses(full["workdir"]), _losses(part)
  assert sorted(b) == list(range(1, 21))
  np.testing.assert_allclose([b[s] for s in range(11, 21)], [a[s] for s in range(11, 21)], rtol=1e-6)
  # the resumed process's clock continues from the first one's last row
  with open(os.path.join(part, "metrics.jsonl")) as f:
    wall = [json.loads(l)["train/wall_s"] for l in f]
  assert len(wall) == 20 and all(np.diff(wall) > 0) and wall[0] > 0
  # TensorBoard is told to hide the first process's events from step 11 on
  # (none here; those of steps lost to a kill between checkpoints)
  assert _tensorboard_purge_steps(part) == [11]
  assert _tensorboard_purge_steps(full["workdir"]) == []
  # and the whole state continues: EMA, its count, the optimizer
  resumed = generate.load_run(part)[1]
  for field in ("params", "ema_params", "ema_num_updates", "opt_state", "step"):
    chex.assert_trees_all_close(getattr(resumed, field), getattr(full["state"], field),
                                rtol=1e-6, atol=1e-7)
  # two starts, two config files; none overwritten
  assert len(os.listdir(os.path.join(part, "configs"))) == 2


@pytest.mark.parametrize("warmup, final", [(0, 0.0), (10, 0.0), (10, 0.2)])
def test_cosine_schedule_values(warmup, final):
  config = tiny_config()
  config.optim.update(learning_rate=2e-3, warmup_steps=warmup, schedule="cosine",
                      final_lr_fraction=final)
  schedule = ts.make_schedule(config.optim, 110)
  lr, span = 2e-3, 110 - warmup
  for step in (warmup, warmup + span // 4, warmup + span // 2, 110, 500):
    frac = min(step - warmup, span) / span
    expected = lr * (final + (1 - final) * 0.5 * (1 + np.cos(np.pi * frac)))
    np.testing.assert_allclose(float(schedule(step)), expected, rtol=1e-5, atol=1e-12)
  if warmup:  # linear warm-up from 0, as the constant schedule's
    np.testing.assert_allclose(float(schedule(warmup // 2)), lr * 0.5, rtol=1e-5)
    assert float(schedule(0)) == 0.0
  constant = ts.make_schedule(tiny_config().optim, 110)  # the default: no decay
  assert float(constant(0)) == float(constant(500)) == tiny_config().optim.learning_rate


def test_resuming_with_another_rate_warns(tmp_path):
  def config(n):
    c = tiny_config(num_steps=n, log_every=2, checkpoint_every=4)
    c.optim.update(schedule="cosine", learning_rate=1e-3)
    return c
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config(4), workdir, log=lambda s: None)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    rates = [json.loads(l)["train/learning_rate"] for l in f]
  # logged at steps 2 and 4, the rate of the step taken (0-based steps 1 and 3)
  np.testing.assert_allclose(rates, [1e-3 * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in (1, 3)],
                             rtol=1e-5)
  msgs = []
  trainer.train_and_evaluate(config(8), workdir, log=msgs.append)
  warning = [m for m in msgs if m.startswith("warning:")]
  assert warning == ["warning: the learning rate at step 4 is 0.0005 where the last start's "
                     "schedule gave 0 (optim.schedule cosine -> cosine, training.num_steps "
                     "4 -> 8)"], msgs
  msgs = []  # the same num_steps again: nothing to warn about
  trainer.train_and_evaluate(config(10), workdir, log=lambda m: None)
  trainer.train_and_evaluate(config(10), workdir, log=msgs.append)
  assert any("resumed" in m for m in msgs) and not any("warning" in m for m in msgs), msgs


def test_held_out_images_stay_out_of_training_and_of_a_resume(tmp_path):
  config = tiny_config(num_steps=2, log_every=1, checkpoint_every=2)
  config.data.holdout = 56
  workdir = str(tmp_path / "run")
  msgs = []
  trainer.train_and_evaluate(config, workdir, log=msgs.append)
  assert ("data: 200 images of synthetic/train (56 training images held out as the "
          "validation split)") in msgs, msgs
  configs = sorted(os.listdir(os.path.join(workdir, "configs")))
  for other in (0, 28):  # another choice would train on held-out images
    config.data.holdout, config.training.num_steps = other, 4
    with pytest.raises(ValueError, match="trained with data.holdout=56"):
      trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  # another source orders the images otherwise: its held-out 56 would be others
  config.data.holdout, source = 56, config.data.source
  config.data.source = "tfds" if source == "offline" else "offline"
  with pytest.raises(ValueError, match=f"data.source='{source}' and holds out 56"):
    trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  config.data.source = source
  assert sorted(os.listdir(os.path.join(workdir, "configs"))) == configs
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                    read_only=True).steps() == [2]
  trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  # sample.py records the run's held-out images, for evaluate.py --reference validation
  out = str(tmp_path / "grid.png")
  generate.sample_from_run(workdir, out, num_steps=2, classes=[1], num_per_class=2,
                           log=lambda s: None)
  with np.load(str(tmp_path / "grid.npz")) as f:
    assert int(f["holdout"]) == 56 and int(f["step"]) == 4


def test_resume_refuses_another_seed_and_tells_what_else_changed(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(num_steps=2, checkpoint_every=2), workdir,
                             log=lambda s: None)
  config = tiny_config(num_steps=4, checkpoint_every=2)
  config.seed = 7  # the data order would follow it, the noise the checkpoint
  with pytest.raises(ValueError, match="Resume with --config.seed=0"):
    trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  config = tiny_config(num_steps=4, checkpoint_every=2)
  config.ema.decay, config.loss.p_mean = 0.99, 0.5
  msgs = []
  trainer.train_and_evaluate(config, workdir, log=msgs.append)
  changed = [m for m in msgs if m.startswith("changed since the last start (3): ")]
  assert changed and all(f in changed[0] for f in (
      "ema.decay: 0.9999 -> 0.99", "loss.p_mean: -1.2 -> 0.5",
      "training.num_steps: 2 -> 4")), msgs


def test_checkpoints_kept_for_good_are_saved_between_checkpoint_steps(tmp_path):
  config = tiny_config(num_steps=13, checkpoint_every=3, max_to_keep=1)
  config.training.keep_every = 4
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  assert checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                   read_only=True).steps() == [4, 8, 12, 13]


def test_a_folder_is_a_run_only_with_what_train_py_writes(tmp_path):
  mine = tmp_path / "myproj"
  (mine / "configs").mkdir(parents=True)
  (mine / "configs" / "exp.yaml").write_text("mine")
  with pytest.raises(FileExistsError, match="not a scoreflow run folder"):
    trainer.prepare_workdir(tiny_config(), str(mine))
  assert sorted(os.listdir(mine)) == ["configs"]
  # a first start stopped before its first checkpoint or config: its folder
  (tmp_path / "stopped" / "checkpoints").mkdir(parents=True)
  assert trainer.prepare_workdir(tiny_config(), str(tmp_path / "stopped"))


def test_config_files_order_the_starts_whatever_the_clock(tmp_path):
  cdir = tmp_path / "configs"
  cdir.mkdir()
  (cdir / "2099-01-01T00-00-00-config.json").write_text("{}")  # a clock ahead, then back
  path = trainer._write_config(tiny_config(), str(tmp_path))
  assert os.path.basename(path) == "2099-01-01T00-00-00-1-config.json"
  files = os.listdir(cdir)
  assert max(files, key=run_config.start_order) == os.path.basename(path)


def test_config_files_are_the_ones_train_py_names():
  for name in ("2026-01-01T00-00-00-config.json", "2026-01-01T00-00-00-12-config.json"):
    assert run_config.is_config_file(name), name
  for name in ("config.json", "notes.json", "2026-01-01-config.json",
               "2026-01-01T00-00-00-config.json.bak", "x2026-01-01T00-00-00-config.json"):
    assert not run_config.is_config_file(name), name


def test_nonfinite_loss_before_any_checkpoint_says_so(tmp_path):
  config = tiny_config(num_steps=40, log_every=1, checkpoint_every=20)
  config.optim.learning_rate = 1e30
  with pytest.raises(trainer.NonFiniteError) as err:
    trainer.train_and_evaluate(config, str(tmp_path / "run"), log=lambda s: None)
  assert "no checkpoint was written yet: start again (the same --workdir" in str(err.value)
  assert "(step None)" not in str(err.value) and "new --workdir" not in str(err.value)


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(num_steps=10, checkpoint_every=10), workdir, log=lambda s: None)
  config = tiny_config(num_steps=40, log_every=5, checkpoint_every=5)
  config.optim.learning_rate = 1e30
  with pytest.raises(trainer.NonFiniteError, match="last good checkpoint") as err:
    trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  # clipping is advised for a new run only: a resume cannot switch it on (below)
  assert "grad_clip_norm=1.0 in a new --workdir" in str(err.value)
  steps = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True).steps()
  assert 10 in steps
  # the run can still be resumed from what is there
  trainer.train_and_evaluate(tiny_config(num_steps=max(steps) + 5, log_every=5, checkpoint_every=5),
                             workdir, log=lambda s: None)


@pytest.mark.parametrize("override, match", [
    (lambda c: c.training.update(batch_size=6), "multiple of the device count"),
    (lambda c: c.sampling.update(sampler="ddim"), "sampler"),
    (lambda c: c.data.update(name="imagenet"), "data.name"),
    (lambda c: c.data.update(source="web"), "data.source"),
    (lambda c: c.model.update(sigma_data=0.0), "sigma_data"),
    (lambda c: c.model.score_flow.update(n_flows=0), "n_flows"),
    (lambda c: c.model.update(network="dit"), "network"),
    (lambda c: c.model.score_flow.update(parameterization="eps"), "parameterization"),
    (lambda c: c.training.update(num_steps=0), "num_steps"),
    (lambda c: c.optim.update(schedule="linear"), "optim.schedule"),
    (lambda c: c.optim.update(schedule="cosine", warmup_steps=100), "no steps to decay"),
    (lambda c: c.optim.update(final_lr_fraction=1.5), "final_lr_fraction"),
    (lambda c: c.optim.update(warmup_steps=-1), "warmup_steps"),
    (lambda c: c.data.update(holdout=-1), "data.holdout"),
    (lambda c: c.data.update(split="valid"), "data.split"),
    (lambda c: c.ema.update(posthoc_stds=(0.05, 0.5)), "ema.posthoc_stds must be sigma_rel"),
    (lambda c: c.ema.update(posthoc_stds=(0.1, 0.1)), "ema.posthoc_stds has a repeated"),
    (lambda c: c.training.update(max_to_keep=0), "training.max_to_keep must be >= 1"),
    (lambda c: c.training.update(image_every=5, images_per_class=0),
     "training.images_per_class must be >= 1"),
    (lambda c: c.sampling.update(num_steps=0), "sampling.num_steps must be >= 1"),
    (lambda c: c.sampling.update(sigma_min=-1.0), "0 < sigma_min < sigma_max"),
    (lambda c: c.sampling.update(sigma_min=90.0), "0 < sigma_min < sigma_max"),
    (lambda c: c.sampling.update(rho=0.0), "sampling.rho"),
    (lambda c: c.sampling.update(batch_size=0), "sampling.batch_size"),
    (lambda c: c.update(seed=-1), "seed must be >= 0"),  # was a data thread's traceback
    (lambda c: c.data.update(holdout=250),  # 6 images left: was the data thread's error
     "batch_size=16 is more than the 6 training images left by data.holdout=250"),
])
def test_bad_config_values(tmp_path, override, match):
  config = tiny_config()
  override(config)
  with pytest.raises(ValueError, match=match):
    trainer.train_and_evaluate(config, str(tmp_path / "run"), log=lambda s: None)
  assert not (tmp_path / "run").exists()


def test_missing_offline_data_dir(tmp_path):
  config = tiny_config()
  config.data.name, config.data.source = "mnist", "offline"
  config.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere"):
    trainer.train_and_evaluate(config, str(tmp_path / "run"), log=lambda s: None)
  assert not (tmp_path / "run").exists()
  # a failed start leaves no empty stamped run folder behind (one per retry)
  with pytest.raises(FileNotFoundError, match="nowhere"):
    trainer.train_and_evaluate(config, None, str(tmp_path / "logs"), log=lambda s: None)
  assert os.listdir(tmp_path / "logs") == []
  # an empty folder the user made is theirs: left
  (tmp_path / "mine").mkdir()
  with pytest.raises(FileNotFoundError, match="nowhere"):
    trainer.train_and_evaluate(config, str(tmp_path / "mine"), log=lambda s: None)
  assert (tmp_path / "mine").is_dir()


def test_the_runs_data_folder_is_saved_absolute(tmp_path, monkeypatch):
  # bits_per_dim.py and evaluate.py --diagnose read the run's data from its
  # saved config, from any folder; a bucket URL is kept as it is
  monkeypatch.chdir(tmp_path)
  for given, saved in (("rel/mnist", str(tmp_path / "rel" / "mnist")),
                       ("gs://bucket/tfds", "gs://bucket/tfds")):
    config = tiny_config(num_steps=1)  # synthetic: the folder is not read
    config.data.data_dir = given
    workdir = str(tmp_path / given.replace("/", "_").replace(":", ""))
    trainer.train_and_evaluate(config, workdir, log=lambda s: None)
    assert run_config.load(workdir).data.data_dir == saved


def test_workdir_that_is_not_a_run_is_left_alone(tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("precious")
  with pytest.raises(FileExistsError, match="not a scoreflow run"):
    trainer.train_and_evaluate(tiny_config(), str(tmp_path / "mine"), log=lambda s: None)
  assert os.listdir(tmp_path / "mine") == ["notes.txt"]
  assert (tmp_path / "mine" / "notes.txt").read_text() == "precious"


def test_runs_started_in_the_same_second_get_folders_of_their_own(tmp_path, monkeypatch):
  # a sweep started with & stamps its folders to the second: they shared one
  monkeypatch.setattr(trainer.time, "strftime", lambda fmt: "2026-12-02T12-00-00")
  config = tiny_config()
  made = [trainer.prepare_workdir(config, None, str(tmp_path / "logs")) for _ in range(3)]
  base = str(tmp_path / "logs" / f"2026-12-02T12-00-00-{config.run_name}")
  assert made == [base, base + "-1", base + "-2"] and all(os.path.isdir(m) for m in made)


def test_workdir_that_is_a_file_is_refused(tmp_path):
  (tmp_path / "run").write_text("precious")
  with pytest.raises(NotADirectoryError, match="is a file, not a run folder"):
    trainer.train_and_evaluate(tiny_config(), str(tmp_path / "run"), log=lambda s: None)
  assert (tmp_path / "run").read_text() == "precious"


def test_resume_that_would_delete_kept_checkpoints_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  ckpts = lambda: checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"),
                                             read_only=True).steps()
  trainer.train_and_evaluate(tiny_config(num_steps=8, checkpoint_every=2, keep_every=4,
                                         max_to_keep=1), workdir, log=lambda s: None)
  assert ckpts() == [4, 8]
  for keep_every in (0, 8, 3):  # each would let orbax delete step 4 (or 8)
    with pytest.raises(ValueError, match=r"steps \[4, 8\]|steps \[4\]"):
      trainer.train_and_evaluate(tiny_config(num_steps=12, checkpoint_every=2, max_to_keep=1,
                                             keep_every=keep_every),
                                 workdir, log=lambda s: None)
    assert ckpts() == [4, 8]
  # a divisor of the old period keeps them all
  trainer.train_and_evaluate(tiny_config(num_steps=12, checkpoint_every=2, keep_every=2,
                                         max_to_keep=1), workdir, log=lambda s: None)
  assert ckpts() == [4, 8, 10, 12]


def test_resume_on_other_data_is_refused(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(num_steps=2, checkpoint_every=2), workdir,
                             log=lambda s: None)
  for field, value, match in (("image_size", 16, r"shape \(28, 28, 1\)"),
                              ("split", "test", "data.split='train'")):
    config = tiny_config(num_steps=4)
    config.data[field] = value
    with pytest.raises(ValueError, match=match):
      trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  # clipping on or off changes the optimizer state's layout (its advice was a dead end)
  config = tiny_config(num_steps=4)
  config.optim.grad_clip_norm = 1.0
  with pytest.raises(ValueError, match="optim.grad_clip_norm=0.0; resuming with 1.0"):
    trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  msgs = []  # resumed with num_steps at or below the run's step: nothing trains, and says so
  trainer.train_and_evaluate(tiny_config(num_steps=2), workdir, log=msgs.append)
  assert any(m.startswith("nothing to train: the run is at step 2 and "
                          "training.num_steps=2") for m in msgs), msgs


def _tree_snapshot(path):
  out = {}
  for root, _, files in os.walk(path):
    for f in files:
      p = os.path.join(root, f)
      out[os.path.relpath(p, path)] = open(p, "rb").read()
  return out


def test_mismatched_config_is_refused_and_checkpoint_untouched(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(num_steps=5, checkpoint_every=5), workdir, log=lambda s: None)
  before = _tree_snapshot(os.path.join(workdir, "checkpoints"))
  config = tiny_config(num_steps=10)
  config.model.score_flow.model_channels = 32
  with pytest.raises(checkpointing.CheckpointError,
                     match=r"(?s)model_channels.*Resume the run with its own config"):
    trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  assert _tree_snapshot(os.path.join(workdir, "checkpoints")) == before
  # a reader (sample.py, evaluate.py) of a folder whose config and checkpoints
  # disagree is not told to train: they were put together from two runs
  reader = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
  abstract = generate.abstract_train_state(model_lib.build_model(config), config)
  with pytest.raises(checkpointing.CheckpointError) as err:
    reader.restore(abstract, config)
  assert "model_channels" in str(err.value) and "train.py" not in str(err.value)
  assert "copied in from another run" in str(err.value)
  assert _tree_snapshot(os.path.join(workdir, "checkpoints")) == before


def test_corrupt_checkpoint_gets_a_clear_error(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(num_steps=5, checkpoint_every=5), workdir, log=lambda s: None)
  state_dir = os.path.join(workdir, "checkpoints", "5", "state")
  for root, _, files in os.walk(state_dir):
    for f in files:
      if f != "commit_success.txt":
        with open(os.path.join(root, f), "wb") as fh:
          fh.write(b"garbage")
  with pytest.raises(checkpointing.CheckpointError, match="move it out"):
    trainer.train_and_evaluate(tiny_config(num_steps=10), workdir, log=lambda s: None)
  assert os.path.isdir(state_dir)


def test_a_single_process_save_of_replicated_arrays_compiles_nothing(tmp_path):
  # orbax's replica-parallel save slices each replicated array on each device,
  # one compiled slice per shape and device at the first save (9 s for the
  # UNet on 4 devices); in one process the arrays are saved whole. Shapes no
  # other test has, so nothing is in JAX's in-memory caches already; orbax
  # slices along an axis the device count divides.
  mesh = ts.make_mesh()
  assert mesh.size == 4
  w = np.arange(12 * 7 * 11, dtype=np.float32).reshape(12, 7, 11)
  state = ts.replicate({"step": np.int32(3), "w": w, "b": np.ones(52, np.float32)}, mesh)
  lowered = []
  listen = lambda event, duration, **kw: lowered.append(event)
  jax.monitoring.register_event_duration_secs_listener(listen)
  try:
    ckpt = checkpointing.Checkpointer(str(tmp_path / "checkpoints"))
    ckpt.manager.save(3, args=checkpointing.ocp.args.Composite(
        state=checkpointing.ocp.args.StandardSave(state)))
    ckpt.wait()
  finally:
    jax.monitoring.unregister_event_duration_listener(listen)
  assert not [e for e in lowered if e.startswith("/jax/core/compile/")], lowered
  restored = ckpt.manager.restore(3)["state"]
  assert np.array_equal(restored["w"], w) and np.array_equal(restored["b"], np.ones(52))
  ckpt.close()


def test_replica_parallel_save_stays_orbaxs_across_processes(monkeypatch):
  registered = []
  monkeypatch.setattr(checkpointing.ocp.type_handlers, "register_type_handler",
                      lambda ty, handler, override=False: registered.append((ty, handler)))
  monkeypatch.setattr(checkpointing, "_whole_array_handler", None)  # as in a new process
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  checkpointing._save_replicated_arrays_whole()
  assert registered == []  # orbax's default: the hosts divide the writing
  monkeypatch.setattr(jax, "process_count", lambda: 1)
  checkpointing._save_replicated_arrays_whole()
  assert [ty for ty, _ in registered] == [jax.Array]
  assert registered[0][1]._use_replica_parallel is False


def test_whole_array_saves_are_registered_once_and_quietly(tmp_path, monkeypatch, caplog):
  # orbax warns of each handler override: a line in every run's log before
  monkeypatch.setattr(checkpointing, "_whole_array_handler", None)  # as in a new process
  registrations = []
  register = checkpointing.ocp.type_handlers.register_type_handler
  monkeypatch.setattr(checkpointing.ocp.type_handlers, "register_type_handler",
                      lambda *a, **kw: (registrations.append(a), register(*a, **kw)))
  with caplog.at_level("WARNING"):
    for name in ("a", "b"):
      checkpointing.Checkpointer(str(tmp_path / name)).close()
    # nor does sample.py's read-only reader say its folder is read only
    checkpointing.Checkpointer(str(tmp_path / "a"), read_only=True).close()
  assert len(registrations) == 1
  told = [r.getMessage() for r in caplog.records]
  assert not [m for m in told if "handler" in m.lower() or "read only" in m], told


def test_checkpoint_signature_ignores_other_networks_and_fills_legacy_fields():
  config = tiny_config()
  old = json.loads(config.model.to_json())
  del old["unet"]                            # written before the UNet existed
  del old["score_flow"]["flow_type"]         # written before flow_type existed
  assert checkpointing._diff(checkpointing._signature(old),
                             checkpointing.model_signature(config)) == []
  old["score_flow"]["n_flows"] = 7
  assert checkpointing._diff(checkpointing._signature(old),
                             checkpointing.model_signature(config)) == [
      "model.score_flow.n_flows: checkpoint 7 vs config 2"]
  old["score_flow"]["n_flows"] = 2  # the conditioner's settings count too
  old["conditioner"]["embed_dim"] = config.model.conditioner.embed_dim + 1
  assert checkpointing._diff(checkpointing._signature(old),
                             checkpointing.model_signature(config)) == [
      f"model.conditioner.embed_dim: checkpoint {config.model.conditioner.embed_dim + 1} "
      f"vs config {config.model.conditioner.embed_dim}"]


def test_run_config_of_an_older_run_gets_the_legacy_values(tmp_path, monkeypatch):
  config = json.loads(tiny_config().to_json())
  for field in run_config.LEGACY_DEFAULTS["score_flow"]:
    del config["model"]["score_flow"][field]  # a run written before these existed
  os.makedirs(tmp_path / "configs")
  with open(tmp_path / "configs" / "2026-01-01T00-00-00-config.json", "w") as f:
    json.dump(config, f)
  # also where configs/ is not importable (a script run from elsewhere)
  for defaults in (run_config._defaults, lambda: {}):
    monkeypatch.setattr(run_config, "_defaults", defaults)
    loaded = run_config.load(str(tmp_path))
    for field, value in run_config.LEGACY_DEFAULTS["score_flow"].items():
      assert loaded.model.score_flow[field] == value, field
    assert loaded.model.score_flow.n_flows == config["model"]["score_flow"]["n_flows"]
    model_lib.build_model(loaded)


def test_run_config_legacy_values_win_over_newer_defaults(tmp_path, monkeypatch):
  config = json.loads(tiny_config().to_json())
  del config["model"]["score_flow"]["flow_type"]  # a run from before flow_type
  del config["sampling"]["sigma_min"]             # and a field with no legacy value
  os.makedirs(tmp_path / "configs")
  with open(tmp_path / "configs" / "2026-01-01T00-00-00-config.json", "w") as f:
    json.dump(config, f)
  newer = json.loads(tiny_config().to_json())  # defaults that have since changed
  newer["model"]["score_flow"]["flow_type"] = "conv"
  newer["sampling"]["sigma_min"] = 0.005
  monkeypatch.setattr(run_config, "_defaults", lambda: newer)
  loaded = run_config.load(str(tmp_path))
  assert loaded.model.score_flow.flow_type == "joint"  # what the run was trained with
  assert loaded.sampling.sigma_min == 0.005


def test_run_config_is_the_latest_start_even_within_one_second(tmp_path):
  os.makedirs(tmp_path / "configs")
  for name, steps in [("2026-01-01T00-00-00-config.json", 1),
                      ("2026-01-01T00-00-00-1-config.json", 2),   # same second, later
                      ("2026-01-01T00-00-00-2-config.json", 3),
                      ("2025-12-31T23-59-59-config.json", 4)]:
    config = tiny_config(num_steps=steps)
    with open(tmp_path / "configs" / name, "w") as f:
      f.write(config.to_json())
  assert run_config.load(str(tmp_path)).training.num_steps == 3


def test_run_config_that_train_py_did_not_write_is_refused(tmp_path):
  os.makedirs(tmp_path / "configs")
  path = tmp_path / "configs" / "2026-01-01T00-00-00-config.json"
  for text in ("[]", '{"data": {}}', '{"model": 3}'):
    path.write_text(text)
    with pytest.raises(ValueError, match=r"is not a config saved by train.py \(no 'model' "
                                         r"section\); move it out of"):
      run_config.load(str(tmp_path))
  path.write_text('{"model": {')  # cut short
  with pytest.raises(ValueError, match=r"newest saved config, is not valid JSON .* to use "
                                       "the start before it, or repair it"):
    run_config.load(str(tmp_path))
  assert path.read_text() == '{"model": {'  # left as it is


@pytest.fixture(scope="module")
def kept_run(tmp_path_factory):
  """A tiny conv-mixture run with every step kept and two power EMAs tracked
  (ema.posthoc_stds), its log and its state at each step: shared by the
  post-hoc averaging tests, which leave it as it is."""
  from configs import mnist_conv_mixture
  config = mnist_conv_mixture.get_config("tiny")
  config.training.update(num_steps=4, log_every=2, checkpoint_every=1, keep_every=1,
                         image_every=0)
  config.ema.posthoc_stds = (0.05, 0.1)
  workdir = str(tmp_path_factory.mktemp("kept") / "run")
  logs = []
  trainer.train_and_evaluate(config, workdir, log=logs.append)
  at = {s: generate.load_run(workdir, s)[1] for s in range(1, 5)}
  return dict(config=config, workdir=workdir, logs=logs, at=at)


def _moved(a, b):
  return max(float(jnp.max(jnp.abs(x - y)))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _frozen_base(params):
  from scoreflow_jax.networks import gaussian_base
  return [x for path, x in jax.tree_util.tree_leaves_with_path(params)
          if any(getattr(k, "key", None) == gaussian_base.MODULE_NAME for k in path)]


def test_average_of_checkpoints_is_the_mean_of_their_raw_weights(kept_run, tmp_path):
  # A post-hoc weight average (sample.py --average_from): the mean of the raw
  # weights kept at the steps asked for; the frozen mixture base comes back
  # bit for bit, the EMA is the last step's.
  workdir, at = kept_run["workdir"], kept_run["at"]
  msgs = []
  _, avg, _ = generate.load_run(workdir, average_from=3, log=msgs.append)
  assert msgs == ["raw weights averaged over 2 checkpoint(s) at steps [3, 4]"]
  assert int(avg.step) == 4
  chex.assert_trees_all_close(avg.params, jax.tree.map(
      lambda a, b: (a + b) / 2, at[3].params, at[4].params), rtol=1e-6, atol=1e-7)
  chex.assert_trees_all_equal(avg.ema_params, at[4].ema_params)
  assert _frozen_base(avg.params)
  chex.assert_trees_all_equal(_frozen_base(avg.params), _frozen_base(at[4].params))
  assert _moved(at[3].params, at[4].params) > 1e-4  # training moved the weights
  assert _moved(avg.params, at[4].params) > 1e-5 and _moved(avg.params, at[3].params) > 1e-5
  # --step bounds the range; one checkpoint averages to itself, exactly
  _, one, _ = generate.load_run(workdir, 2, average_from=2, log=msgs.append)
  chex.assert_trees_all_equal(one.params, at[2].params)
  assert msgs[-1] == "raw weights averaged over 1 checkpoint(s) at steps [2]"
  generate.load_run(workdir, 3, average_from=0, log=msgs.append)
  assert msgs[-1] == "raw weights averaged over 3 checkpoint(s) at steps [1, 2, 3]"
  with pytest.raises(ValueError, match=r"no checkpoint at steps 7..4 to average; "
                     r"steps there: \[1, 2, 3, 4\].*keep_every"):
    generate.load_run(workdir, average_from=7)
  with pytest.raises(ValueError, match="use_ema=False"):
    generate.sample_from_run(workdir, str(tmp_path / "x.png"), average_from=2)
  assert not os.path.exists(tmp_path / "x.png")


def test_posthoc_ema_tracks_power_emas_and_reconstructs_them(kept_run, tmp_path):
  # ema.posthoc_stds: the train step keeps one power-function EMA per std
  # (checked against the raw weights of every step, all kept); sample.py
  # --posthoc_ema reconstructs any width from the kept snapshots, a tracked
  # width exactly, the frozen mixture base bit for bit.
  from scoreflow_jax import ema
  workdir, at = kept_run["workdir"], kept_run["at"]
  stds = (0.05, 0.1)
  assert any("power-function EMAs at sigma_rel (0.05, 0.1)" in m for m in kept_run["logs"])
  shadows = tuple(jax.tree.map(jnp.zeros_like, at[1].params) for _ in stds)
  for s in range(1, 5):
    shadows = ema.power_ema_update(shadows, at[s].params, s, stds)
  chex.assert_trees_all_close(at[4].phema_params, shadows, rtol=1e-5, atol=1e-7)
  assert _moved(at[4].phema_params[0], at[4].phema_params[1]) > 1e-5

  msgs = []
  _, same, _ = generate.load_run(workdir, posthoc_ema=0.1, log=msgs.append)
  chex.assert_trees_all_close(same.params, at[4].phema_params[1], rtol=1e-5, atol=1e-7)
  assert "post-hoc EMA sigma_rel 0.1 at step 4 from 4 checkpoint(s) x 2 power EMAs" in msgs[0]
  assert "profile fit error 0.0%" in msgs[0]
  _, mid, _ = generate.load_run(workdir, 3, posthoc_ema=0.07, log=msgs.append)
  assert "at step 3 from 3 checkpoint(s)" in msgs[-1]
  in_t, in_std = np.repeat([1, 2, 3], 2), np.tile(stds, 3)
  coef, _ = ema.posthoc_coefficients(in_t, in_std, 3, 0.07)
  want = jax.tree.map(lambda *xs: sum(c * x for c, x in zip(coef, xs)),
                      *[p for s in range(1, 4) for p in at[s].phema_params])
  chex.assert_trees_all_close(mid.params, want, rtol=1e-4, atol=1e-6)
  assert _frozen_base(mid.params)
  chex.assert_trees_all_equal(_frozen_base(mid.params), _frozen_base(at[4].params))

  with pytest.raises(ValueError, match="sigma_rel must be in"):
    generate.load_run(workdir, posthoc_ema=0.5)
  with pytest.raises(ValueError, match="use_ema=False"):
    generate.sample_from_run(workdir, str(tmp_path / "x.png"), posthoc_ema=0.05)
  assert not os.path.exists(tmp_path / "x.png")
  # Resuming with other stds (or none) is refused before anything is written
  before = _tree_snapshot(os.path.join(workdir, "checkpoints"))
  config = kept_run["config"].copy_and_resolve_references()
  for other in ((0.05,), ()):
    config.ema.posthoc_stds = other
    config.training.num_steps = 6
    with pytest.raises(checkpointing.CheckpointError,
                       match=r"posthoc_stds=\(0.05, 0.1\) but the config asks for"):
      trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  assert _tree_snapshot(os.path.join(workdir, "checkpoints")) == before


def test_posthoc_ema_needs_a_run_that_tracked_power_emas(tmp_path):
  workdir = str(tmp_path / "run")
  trainer.train_and_evaluate(tiny_config(num_steps=2, checkpoint_every=2), workdir,
                             log=lambda s: None)
  with pytest.raises(ValueError, match="tracked no power-function EMAs.*posthoc_stds"):
    generate.load_run(workdir, posthoc_ema=0.05)


def test_checkpoint_written_before_power_emas_existed_restores(tmp_path):
  # Checkpoints from before TrainState.phema_params (and their meta without
  # posthoc_stds) restore with an empty tuple there.
  import dataclasses
  import orbax.checkpoint as ocp
  workdir = str(tmp_path / "run")
  config = tiny_config(num_steps=2, checkpoint_every=2)
  trainer.train_and_evaluate(config, workdir, log=lambda s: None)
  state = generate.load_run(workdir)[1]
  old = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)
         if f.name != "phema_params"}
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  ckpt.manager.save(4, args=ocp.args.Composite(
      state=ocp.args.StandardSave(old),
      meta=ocp.args.JsonSave({"model": checkpointing.model_signature(config), "step": 4})))
  ckpt.wait()
  ckpt.close()
  restored = generate.load_run(workdir, 4)[1]
  assert restored.phema_params == ()
  chex.assert_trees_all_equal(restored.params, state.params)
  # a state of other shapes is refused from the checkpoint's metadata, before
  # orbax reads an array, naming every array that differs and both shapes
  abstract = jax.eval_shape(lambda: restored.replace(params=jax.tree.map(
      lambda a: jnp.zeros(a.shape + (2,), a.dtype), restored.params)))
  n_params = len(jax.tree.leaves(restored.params))
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"))
  for step in (2, 4):
    with pytest.raises(checkpointing.CheckpointError) as err:
      ckpt.restore(abstract, config, step=step)
    message = str(err.value)
    assert f"({n_params} arrays differ; stored vs now)" in message
    kernel = next(line for line in message.splitlines() if "params/" in line)
    stored, now = re.search(r": (\(.*\)) vs (\(.*\))$", kernel).groups()
    assert eval(now) == eval(stored) + (2,)
    assert "optim" in message and "new --workdir" in message
  # reading only the params checks only theirs
  with pytest.raises(checkpointing.CheckpointError, match=f"{n_params} arrays differ"):
    ckpt.restore(abstract, config, step=2, fields=("params",))
  assert set(ckpt.restore(jax.eval_shape(lambda: restored), config, step=2,
                          fields=("params",))) == {"params"}
  # a state the metadata allows that orbax still cannot restore: an old
  # checkpoint fails first for its missing power EMAs, then for the cause;
  # both are told (orbax's errors stood in for)
  errors = iter([ValueError("tree structures do not match: phema_params MISSING"),
                 ValueError("Requested shape (3,) is not compatible with (2,)")])
  def fail(step, target):
    raise next(errors)
  ckpt._restore_state = fail
  with pytest.raises(checkpointing.CheckpointError) as err:
    ckpt.restore(jax.eval_shape(lambda: restored), config, step=4)
  assert "phema_params MISSING" in str(err.value)
  assert "before power EMAs (without phema_params): Requested shape" in str(err.value)
  ckpt.close()


def test_log_rows_average_each_sigma_bin_over_the_interval():
  step = lambda loss, sums, counts, finite=True: {
      "loss": np.float32(loss), "grad_norm": np.float32(1.0),
      "learning_rate": np.float32(1e-3), "finite": np.bool_(finite),
      "loss_bin_sum": np.asarray(sums, np.float32),
      "loss_bin_count": np.asarray(counts, np.float32)}
  out, finite = trainer._summarize([step(2.0, [1.0, 6.0, 0.0, 0.0], [1, 2, 0, 0]),
                                    step(4.0, [3.0, 0.0, 0.0, 8.0], [1, 0, 0, 2])])
  assert finite and out["train/loss"] == 3.0
  # per bin: (sum over steps) / (count over steps); empty bins are left out
  assert {k: v for k, v in out.items() if "sigma" in k} == {
      "train/loss_sigma_0-0.1": 2.0, "train/loss_sigma_0.1-0.5": 3.0,
      "train/loss_sigma_2-inf": 4.0}
  assert not trainer._summarize([step(1.0, [0, 0, 0, 0], [0, 0, 0, 0], finite=False)])[1]
  # the gradient norm is the interval's mean too; the learning rate its last step's
  steps = [step(1.0, [1, 0, 0, 0], [1, 0, 0, 0]), step(1.0, [1, 0, 0, 0], [1, 0, 0, 0])]
  steps[1].update(grad_norm=np.float32(3.0), learning_rate=np.float32(2e-3))
  out, _ = trainer._summarize(steps)
  assert out["train/grad_norm"] == 2.0 and out["train/learning_rate"] == pytest.approx(2e-3)


def test_a_batch_that_does_not_split_over_the_devices_is_named():
  mesh = ts.make_mesh()  # 4 devices
  with pytest.raises(ValueError, match="a batch of 6 rows does not split over 4 devices"):
    ts.global_batch({"jpg": np.zeros((6, 2)), "cls": np.zeros(6, np.int32)}, mesh)
  assert ts.global_batch({"cls": np.arange(8)}, mesh)["cls"].shape == (8,)
