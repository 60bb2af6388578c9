"""train.py and sample.py as a user runs them (subprocesses, tiny config)."""
import glob
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from PIL import Image

from scoreflow_jax import generate, run_config, train_step as ts

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(*args, check=True):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
             JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=600)
  if check and proc.returncode != 0:
    raise AssertionError(f"{args} failed:\n{proc.stdout}\n{proc.stderr[-3000:]}")
  return proc


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("cli") / "run")
  proc = run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", workdir,
             "--config.training.num_steps=10", "--config.training.image_every=10")
  return workdir, proc.stdout


def test_train_run_folder_layout(trained_run):
  workdir, out = trained_run
  assert "step 10/10" in out and "ETA" in out and "steps/s" in out
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]
  configs = glob.glob(os.path.join(workdir, "configs", "*.json"))
  assert len(configs) == 1
  cfg = json.load(open(configs[0]))
  assert cfg["training"]["num_steps"] == 10  # the command-line override was resolved
  assert cfg["model"]["score_flow"]["parameterization"] == "preconditioned"
  assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
  rows = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows] == [5, 10]
  assert all(np.isfinite(r["train/loss"]) for r in rows)
  assert 0 < rows[0]["train/wall_s"] < rows[1]["train/wall_s"]  # since the run started
  grid = Image.open(os.path.join(workdir, "images", "train", "step_0000010.png"))
  # one row per class (10), images_per_class (2) columns of 28 px + 2 px gaps
  assert grid.size == (2 * 30, 10 * 30)
  assert os.path.exists(os.path.join(workdir, "loss_curve.png"))


def test_loss_curves_of_several_runs(trained_run, tmp_path):
  workdir, _ = trained_run
  out = str(tmp_path / "curves.png")
  proc = run("-m", "scoreflow_jax.run_logging", "--x", "wall", "--out", out,
             f"a={workdir}", f"b={workdir}/metrics.jsonl")
  assert "a: 2 points, last step 10" in proc.stdout and Image.open(out).size == (600, 400)
  bad = run("-m", "scoreflow_jax.run_logging", "--out", out, f"a={tmp_path}/nothing",
            "--overwrite", check=False)
  assert bad.returncode == 2 and "metrics.jsonl" in bad.stderr and "nothing" in bad.stderr
  (tmp_path / "mine.png").write_bytes(b"a figure")  # not replaced unasked
  bad = run("-m", "scoreflow_jax.run_logging", "--out", str(tmp_path / "mine.png"),
            f"a={workdir}", check=False)
  assert bad.returncode == 2 and "exists; pass --overwrite" in bad.stderr
  assert (tmp_path / "mine.png").read_bytes() == b"a figure"
  # a mistyped --workdir with --config.* flags: told it is not a run
  bad = run("train.py", "--workdir", str(tmp_path / "typo"),
            "--config.training.num_steps=5", check=False)
  assert bad.returncode != 0 and "is not a run folder" in bad.stderr
  assert "Unknown command line flag" not in bad.stderr


def test_sample_writes_grid_and_npz(trained_run, tmp_path):
  workdir, _ = trained_run
  out = str(tmp_path / "grid.png")
  proc = run("sample.py", "--workdir", workdir, "--sampler", "euler_ancestral",
             "--num_steps", "3", "--cfg_scale", "2.0", "--classes", "3,1,4",
             "--num_per_class", "3", "--seed", "1", "--batch_size", "4", "--out", out)
  assert "9 images" in proc.stdout
  assert Image.open(out).size == (3 * 30, 3 * 30)
  npz = np.load(str(tmp_path / "grid.npz"))
  assert npz["images"].shape == (9, 28, 28, 1)
  assert npz["images"].dtype == np.float32
  assert npz["images"].min() >= -1 and npz["images"].max() <= 1
  np.testing.assert_array_equal(npz["labels"], [3, 3, 3, 1, 1, 1, 4, 4, 4])
  assert int(npz["step"]) == 10 and int(npz["holdout"]) == 0  # trained on all of train
  assert str(npz["data_source"]) == run_config.load(workdir).data.source
  # how they were made (evaluate.py pairs draws by seed)
  assert (int(npz["seed"]), str(npz["sampler"]), int(npz["num_steps"])) == (
      1, "euler_ancestral", 3)
  assert (float(npz["cfg_scale"]), str(npz["weights"]), npz["cfg_interval"].size,
          int(npz["batch_size"])) == (2.0, "EMA weights", 0, 4)
  assert (float(npz["score_scale"]), npz["score_scale_interval"].size) == (1.0, 0)
  # --score_scale reaches the sampler (other images, same noise) and is recorded
  proc = run("sample.py", "--workdir", workdir, "--sampler", "euler_ancestral",
             "--num_steps", "3", "--cfg_scale", "2.0", "--classes", "3,1,4",
             "--num_per_class", "3", "--seed", "1", "--batch_size", "4",
             "--score_scale", "1.5", "--score_scale_interval", "0.5,1000",
             "--out", str(tmp_path / "sharp.png"))
  assert "score x 1.5 for sigma in (0.5, 1000.0)" in proc.stdout, proc.stdout
  with np.load(str(tmp_path / "sharp.npz")) as f:
    assert float(f["score_scale"]) == 1.5
    np.testing.assert_array_equal(f["score_scale_interval"], [0.5, 1000.0])
    assert np.abs(f["images"] - npz["images"]).mean() > 0.01
  # --score_scale alone scales on the run's sampling.score_scale_interval
  proc = run("sample.py", "--workdir", workdir, "--num_steps", "3", "--classes", "3",
             "--num_per_class", "1", "--score_scale", "1.5", "--out", str(tmp_path / "own.png"))
  assert "score x 1.5 for sigma in (0.1, 1.0)" in proc.stdout, proc.stdout
  with np.load(str(tmp_path / "own.npz")) as f:
    assert float(f["score_scale"]) == 1.5
    np.testing.assert_array_equal(f["score_scale_interval"], [0.1, 1.0])
  # the same seed gives the same images
  out2 = str(tmp_path / "grid2.png")
  run("sample.py", "--workdir", workdir, "--sampler", "euler_ancestral", "--num_steps", "3",
      "--cfg_scale", "2.0", "--classes", "3,1,4", "--num_per_class", "3", "--seed", "1",
      "--batch_size", "4", "--out", out2)
  np.testing.assert_array_equal(np.load(str(tmp_path / "grid2.npz"))["images"], npz["images"])
  # ... and another seed other images (an ignored --seed would pass the check above)
  run("sample.py", "--workdir", workdir, "--sampler", "euler_ancestral", "--num_steps", "3",
      "--cfg_scale", "2.0", "--classes", "3,1,4", "--num_per_class", "3", "--seed", "2",
      "--batch_size", "4", "--out", str(tmp_path / "grid_s2.png"))
  other = np.load(str(tmp_path / "grid_s2.npz"))
  assert np.abs(other["images"] - npz["images"]).mean() > 0.01
  assert int(other["seed"]) == 2 and int(other["num_devices"]) == 2
  # without --cfg_scale, the run's own sampling.cfg_scale (as --sampler, --num_steps)
  import shutil
  copy = str(tmp_path / "run_cfg2")
  shutil.copytree(workdir, copy)
  for name in glob.glob(os.path.join(copy, "configs", "*.json")):
    saved = json.load(open(name))
    saved["sampling"]["cfg_scale"] = 2.0
    json.dump(saved, open(name, "w"))
  out3 = str(tmp_path / "grid3.png")
  generate.sample_from_run(copy, out3, sampler="euler_ancestral", num_steps=3,
                           classes=[3, 1, 4], num_per_class=3, seed=1, batch_size=4,
                           log=lambda s: None)
  with np.load(str(tmp_path / "grid3.npz")) as f:
    assert float(f["cfg_scale"]) == 2.0
    np.testing.assert_allclose(f["images"], npz["images"], atol=1e-5)
  # "EMA weights" are the EMA's: the raw weights give other images
  import jax
  from scoreflow_jax import train_step as ts
  model, state, config = generate.load_run(workdir, sampler="euler_ancestral", num_steps=3,
                                           log=lambda s: None)
  gen = lambda params: generate.generate_images(
      model, params, config.sampling, npz["labels"], jax.random.key(1), (28, 28, 1),
      batch_size=4, cfg_scale=2.0, mesh=ts.make_mesh())
  np.testing.assert_allclose(gen(state.ema_params), npz["images"], atol=1e-4)
  assert np.abs(gen(state.params) - npz["images"]).max() > 1e-2


def test_sample_average_of_checkpoints(trained_run, tmp_path):
  workdir, _ = trained_run
  proc = run("sample.py", "--workdir", workdir, "--average_from", "0", "--num_steps", "2",
             "--classes", "0", "--num_per_class", "2", "--out", str(tmp_path / "a.png"))
  assert "raw weights averaged over 1 checkpoint(s) at steps [10]" in proc.stdout
  assert "step 10 (raw weights averaged from step 0)" in proc.stdout
  assert np.load(str(tmp_path / "a.npz"))["images"].shape == (2, 28, 28, 1)


def test_posthoc_ema_from_the_command_line(trained_run, tmp_path):
  # a tuple override on the command line, and sample.py --posthoc_ema on its run
  workdir = str(tmp_path / "run")
  proc = run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", workdir,
             "--config.training.num_steps=4", "--config.training.image_every=0",
             "--config.training.checkpoint_every=2", "--config.training.keep_every=2",
             "--config.ema.posthoc_stds=(0.05,0.1)")
  assert "power-function EMAs at sigma_rel (0.05, 0.1)" in proc.stdout
  proc = run("sample.py", "--workdir", workdir, "--posthoc_ema", "0.07", "--num_steps", "2",
             "--classes", "0", "--num_per_class", "2", "--out", str(tmp_path / "p.png"))
  assert ("post-hoc EMA sigma_rel 0.07 at step 4 from 2 checkpoint(s) x 2 power EMAs "
          "(0.05, 0.1) (steps [2, 4])") in proc.stdout
  assert "step 4 (post-hoc EMA, sigma_rel 0.07)" in proc.stdout
  assert np.load(str(tmp_path / "p.npz"))["images"].shape == (2, 28, 28, 1)
  for args, message in (
      (("--posthoc_ema", "0.07", "--ema"), "--posthoc_ema replaces the EMA weights; drop --ema"),
      (("--posthoc_ema", "0.07", "--average_from", "2"), "pass one"),
      (("--posthoc_ema", "0.4"), "sigma_rel must be in (0, 0.2887]")):
    proc = run("sample.py", "--workdir", workdir, *args, "--out", str(tmp_path / "x.png"),
               check=False)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  # the run's config decides it: told before JAX starts
  proc, jax_imported = run_noting_jax("sample.py", "--workdir", trained_run[0],
                                      "--posthoc_ema", "0.05", "--out", tmp_path / "x.png")
  assert proc.returncode != 0 and "tracked no power-function EMAs" in proc.stderr
  assert "Traceback" not in proc.stderr and not jax_imported
  assert not os.path.exists(tmp_path / "x.png")


def test_sample_bad_inputs(trained_run, tmp_path):
  workdir, _ = trained_run
  proc = run("sample.py", "--workdir", workdir, "--sampler", "ddim", "--out",
             str(tmp_path / "x.png"), check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr and "ddim" in proc.stderr and "heun_edm" in proc.stderr
  proc = run("sample.py", "--workdir", workdir, "--step", "7", "--out",
             str(tmp_path / "x.png"), check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr and "steps there: [10]" in proc.stderr
  proc, jax_imported = run_noting_jax("sample.py", "--workdir", tmp_path, "--out",
                                      tmp_path / "x.png")  # told before JAX starts
  assert proc.returncode != 0 and "Traceback" not in proc.stderr and "not a run folder" in proc.stderr
  assert not jax_imported
  proc = run("sample.py", "--workdir", workdir, "--average_from", "5", "--ema", "--out",
             str(tmp_path / "x.png"), check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr and "--average_from averages the raw weights; drop --ema" in proc.stderr
  proc = run("sample.py", "--workdir", workdir, "--average_from", "11", "--out",
             str(tmp_path / "x.png"), check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr and "no checkpoint at steps 11..10 to average" in proc.stderr
  for flag, message in (("--cfg_interval=a,b", "takes two numbers lo,hi"),
                        ("--cfg_interval=5,0.3", "0 <= lo < hi"),  # guided nowhere
                        ("--classes=", "--classes is empty"),  # numpy's error, late
                        # the run's scale is 1: an interval would guide nothing
                        ("--cfg_interval=0.3,5", "limits guidance, but the scale is 1")):
    proc = run("sample.py", "--workdir", workdir, flag, "--out", str(tmp_path / "x.png"),
               check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
  assert not os.path.exists(tmp_path / "x.png")


def test_sample_output_files_are_checked_first_and_kept(trained_run, tmp_path):
  workdir, _ = trained_run
  (tmp_path / "mine.npz").write_bytes(b"10k samples")
  (tmp_path / "mine.png").write_bytes(b"a grid")
  # each told before JAX starts (a second, not a JAX start-up)
  for out in ("mine.png", "mine.npz"):  # either name finds the pair
    proc, jax_imported = run_noting_jax("sample.py", "--workdir", workdir, "--out",
                                        tmp_path / out)
    assert proc.returncode != 0 and "exists; pass --overwrite" in proc.stderr, proc.stderr
    assert not jax_imported
  assert (tmp_path / "mine.npz").read_bytes() == b"10k samples"
  for args, message in ((("--out", str(tmp_path / "grid.jpeg")), "must end in .png"),
                        (("--out", str(tmp_path)), "must end in .png"),
                        (("--classes", "1,a"), "--classes takes integer labels"),
                        (("--classes", "3,10"), "classes [10] are outside 0..9"),
                        (("--batch_size", "0"), "--batch_size must be >= 1"),
                        (("--num_per_class", "0"), "--num_per_class must be >= 1, got 0"),
                        (("--num_steps", "0"), "--num_steps must be >= 1, got 0"),
                        (("--step", "-1"), "--step is a checkpoint step, >= 0; got -1"),
                        (("--average_from", "-2"), "--average_from is a checkpoint step")):
    proc, jax_imported = run_noting_jax("sample.py", "--workdir", workdir, *args)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not jax_imported
  proc = run("sample.py", "--workdir", workdir, "--num_steps", "2", "--classes", "0",
             "--num_per_class", "2", "--out", str(tmp_path / "mine.npz"), "--overwrite")
  assert np.load(str(tmp_path / "mine.npz"))["images"].shape == (2, 28, 28, 1)
  assert Image.open(tmp_path / "mine.png").size == (2 * 30, 30)


def test_resume_with_the_runs_own_config(tmp_path):
  workdir = str(tmp_path / "run")
  run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", workdir,
      "--config.training.num_steps=2", "--config.training.image_every=0")
  # no --config: the run's saved one (num_steps 2: nothing left, and it says how to go on)
  files = sorted(str(p) for p in (tmp_path / "run").rglob("*"))
  proc = run("train.py", "--workdir", workdir)
  assert "resumed" in proc.stdout and "nothing to train" in proc.stdout, proc.stdout
  assert f"python train.py --workdir {workdir} --config.training.num_steps=4" in proc.stdout
  assert "data:" not in proc.stdout  # no data loaded, and nothing written (a config
  assert sorted(str(p) for p in (tmp_path / "run").rglob("*")) == files  # and events file)
  # ... with a field changed: --config.* flags on the saved config
  proc = run("train.py", f"--workdir={workdir}", "--config.training.num_steps=4")
  assert "step 4/4" in proc.stdout, proc.stdout
  # the long form, configs/run.py:RUN
  proc = run("train.py", "--config", f"configs/run.py:{workdir}", f"--workdir={workdir}",
             "--config.training.num_steps=6")
  assert "step 6/6" in proc.stdout, proc.stdout
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "6"]
  saved = glob.glob(os.path.join(workdir, "configs", "*.json"))  # one per start
  assert sorted(json.load(open(f))["training"]["num_steps"] for f in saved) == [2, 4, 6]
  proc, jax_imported = run_noting_jax("train.py")  # each told before JAX starts
  assert proc.returncode != 0 and "give --config" in proc.stderr and not jax_imported
  proc, jax_imported = run_noting_jax("train.py", "--workdir", tmp_path)
  assert proc.returncode != 0 and "is not one: no configs/ inside" in proc.stderr
  assert not jax_imported
  proc, jax_imported = run_noting_jax("train.py", "--workdir", tmp_path / "typo")
  assert proc.returncode != 0 and "is not one: it does not exist" in proc.stderr
  assert not jax_imported


def test_train_config_file_and_variant_errors_are_one_line(tmp_path):
  # a mistyped --config path: one line with the configs there are (ml_collections
  # would say "Configuration is not available because of an earlier failure")
  for path in ("configs/mnst.py", "configs/mnist"):
    proc, jax_imported = run_noting_jax("train.py", "--config", path)
    assert proc.returncode == 1 and not jax_imported
    assert proc.stderr.strip() == (
        f"FATAL: --config {path}: no such file (from {ROOT}). The configs in configs/: "
        + ", ".join(sorted(n for n in os.listdir(os.path.join(ROOT, "configs"))
                           if n.endswith(".py") and n not in ("__init__.py", "run.py")))
        + "; or --workdir RUN alone resumes a run with its own config."), proc.stderr
  # a variant the project's configs do not take, and configs/run.py without a
  # run: the config's own message, without the traceback around it
  proc, jax_imported = run_noting_jax("train.py", "--config=configs/mnist.py:tinyy")
  assert proc.returncode == 1 and not jax_imported
  assert proc.stderr.strip() == (
      "FATAL: --config configs/mnist.py:tinyy: unknown config variant 'tinyy': the "
      "configs take none or ':tiny' (e.g. --config configs/mnist.py:tiny)"), proc.stderr
  for variant, message in (("", "configs/run.py needs the run folder after a colon"),
                           (f":{tmp_path}/none", f"{tmp_path}/none does not exist: it "
                            "is not a run folder made by train.py")):
    proc, jax_imported = run_noting_jax("train.py", "--config", f"configs/run.py{variant}")
    assert proc.returncode == 1 and not jax_imported
    assert proc.stderr.startswith(f"FATAL: --config configs/run.py{variant}: {message}")
    assert "Traceback" not in proc.stderr


def test_train_config_typo_is_refused(tmp_path):
  proc = run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", str(tmp_path / "r"),
             "--config.training.batchsize=8", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.splitlines()[0] == (
      "FATAL Flags parsing error: --config.training.batchsize=8: 'batchsize' Did you "
      'mean "batch_size" instead of "batchsize"?')
  assert not (tmp_path / "r").exists()
  # a typo inside the path is named with its flag
  proc = run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", str(tmp_path / "r"),
             "--config.model.score_flw.n_flows=3", check=False)
  assert proc.stderr.splitlines()[0] == (
      "FATAL Flags parsing error: --config.model.score_flw.n_flows=3: 'score_flw' Did you "
      'mean "score_flow" instead of "score_flw"?'), proc.stderr
  # a bug in a config file itself keeps its traceback, pointing at the file
  (tmp_path / "bad.py").write_text("from configs import mnist\n\ndef get_config(arg=None):\n"
                                   "  return mnist.get_config(arg).model.scoreflow\n")
  proc = run("train.py", "--config", str(tmp_path / "bad.py"), "--workdir",
             str(tmp_path / "r"), "--config.seed=1", check=False)
  assert proc.returncode != 0 and "Traceback" in proc.stderr
  assert f'File "{tmp_path / "bad.py"}", line 4, in get_config' in proc.stderr


def test_train_missing_data_is_one_line(tmp_path):
  # README: a user's error is one line naming the fix (a 28-line traceback until
  # session 26); a model's error keeps its traceback
  proc = run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", str(tmp_path / "r"),
             "--config.data.name=mnist", "--config.data.source=offline",
             f"--config.data.data_dir={tmp_path}", check=False)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert "\nflags:\n" not in proc.stderr  # no page of --help either
  assert proc.stderr.splitlines()[-2].startswith(
      f"error: MNIST file {tmp_path}/train-images-idx3-ubyte.gz (or without .gz) not found")
  assert proc.stderr.splitlines()[-1] == "(SCOREFLOW_TRACEBACK=1 shows where it was raised)"


def test_train_bad_values_are_one_line_before_any_work(tmp_path):
  proc = run("train.py", "--config", "configs/mnist.py:tiny", "--workdir", str(tmp_path / "r"),
             "--config.sampling.num_steps=0", "--config.training.max_to_keep=0", check=False)
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert proc.stderr.rstrip().endswith("invalid config:\n  training.max_to_keep must be >= 1 "
                                       "(how many of the latest checkpoints stay; 0 would keep "
                                       "none), got 0\n  sampling.num_steps must be >= 1, got 0")
  assert not (tmp_path / "r").exists()


def test_training_errors_tells_a_users_error_and_keeps_a_models(monkeypatch):
  from absl import app
  from scoreflow_jax import usage
  monkeypatch.delenv("SCOREFLOW_TRACEBACK", raising=False)
  for told in (FileNotFoundError("no file x"),
               ValueError("loss not finite: lower --config.optim.learning_rate"),
               ValueError("training.batch_size=512 is more than the 256 training images"),
               FileExistsError("--workdir w exists and is not a scoreflow run folder")):
    with pytest.raises(app.UsageError, match=str(told.args[0])):
      with usage.training_errors():
        raise told
  for kept in (ValueError("incompatible shapes (3,) and (4,)"), TypeError("bad operand"),
               ValueError("set jax.config.update('jax_enable_x64', True)")):
    with pytest.raises(type(kept), match=r"^" + str(kept.args[0])[:10]):
      with usage.training_errors():
        raise kept
  monkeypatch.setenv("SCOREFLOW_TRACEBACK", "1")  # a bug behind a user's message
  with pytest.raises(FileNotFoundError):
    with usage.training_errors():
      raise FileNotFoundError("no file x")


def test_sample_from_run_raw_weights_interval_classes_and_atomic_npz(trained_run, tmp_path,
                                                                      monkeypatch):
  workdir, _ = trained_run
  kw = dict(sampler="euler_ancestral", num_steps=3, classes=[3, 1], num_per_class=2,
            seed=1, batch_size=4, log=lambda s: None)
  model, state, config = generate.load_run(workdir, sampler="euler_ancestral", num_steps=3,
                                           log=lambda s: None)
  gen = lambda params: generate.generate_images(
      model, params, config.sampling, np.repeat([3, 1], 2), jax.random.key(1), (28, 28, 1),
      batch_size=4, cfg_scale=1.0, mesh=ts.make_mesh())
  # use_ema=False (sample.py --noema) samples the raw weights
  raw = generate.sample_from_run(workdir, str(tmp_path / "raw.png"), use_ema=False, **kw)
  np.testing.assert_allclose(raw, gen(state.params), atol=1e-4)
  with np.load(tmp_path / "raw.npz") as f:
    assert str(f["weights"]) == "raw weights"
  # --cfg_interval reaches the sampler and is recorded: one above sigma_max guides
  # no step (scale 3 there is scale 1); the batch recorded is the one drawn in
  out = generate.sample_from_run(workdir, str(tmp_path / "iv.png"), cfg_scale=3.0,
                                 cfg_interval=(1e3, 2e3), **dict(kw, batch_size=256))
  np.testing.assert_allclose(out, gen(state.ema_params), atol=1e-4)
  with np.load(tmp_path / "iv.npz") as f:
    np.testing.assert_array_equal(f["cfg_interval"], [1e3, 2e3])
    assert int(f["batch_size"]) == 4
  # a score scale above sigma_max scales no step; inside, the library's images
  out = generate.sample_from_run(workdir, str(tmp_path / "ss0.png"),
                                 score_scale=(2.0, (1e3, 2e3)), **kw)
  np.testing.assert_allclose(out, gen(state.ema_params), atol=1e-4)
  out = generate.sample_from_run(workdir, str(tmp_path / "ss.png"),
                                 score_scale=(1.5, (0.0, 1e3)), **kw)
  sharp = generate.generate_images(
      model, state.ema_params, config.sampling, np.repeat([3, 1], 2), jax.random.key(1),
      (28, 28, 1), batch_size=4, cfg_scale=1.0, mesh=ts.make_mesh(),
      score_scale=(1.5, (0.0, 1e3)))
  np.testing.assert_allclose(out, sharp, atol=1e-4)
  assert np.abs(out - gen(state.ema_params)).mean() > 0.01
  with np.load(tmp_path / "ss.npz") as f:
    assert float(f["score_scale"]) == 1.5
    np.testing.assert_array_equal(f["score_scale_interval"], [0.0, 1e3])
  with pytest.raises(ValueError, match="needs its sigma_interval"):
    generate.sample_from_run(workdir, str(tmp_path / "ss1.png"), score_scale=(2.0, None), **kw)
  assert not os.path.exists(tmp_path / "ss1.npz")
  # the config's sampling.score_scale when none is passed (the training grids'
  # sampler too); a scale of 1 is none: the plain images, bit for bit
  scaled_config = config.sampling.copy_and_resolve_references()
  scaled_config.score_scale, scaled_config.score_scale_interval = 1.5, (0.0, 1e3)
  own = generate.generate_images(
      model, state.ema_params, scaled_config, np.repeat([3, 1], 2), jax.random.key(1),
      (28, 28, 1), batch_size=4, cfg_scale=1.0, mesh=ts.make_mesh())
  np.testing.assert_array_equal(own, sharp)
  for none in ((1.0, (0.0, 1e3)), (1.0, None), generate.NO_SCORE_SCALE):
    plain = generate.generate_images(
        model, state.ema_params, scaled_config, np.repeat([3, 1], 2), jax.random.key(1),
        (28, 28, 1), batch_size=4, cfg_scale=1.0, mesh=ts.make_mesh(), score_scale=none)
    np.testing.assert_array_equal(plain, gen(state.ema_params))
  # a label outside the run's classes is refused (it embeds as NaN)
  with pytest.raises(ValueError, match=r"classes \[10\] are outside 0..9"):
    generate.sample_from_run(workdir, str(tmp_path / "bad.png"), **dict(kw, classes=[10]))
  # the grid shows at most GRID_COLUMNS per class, the first ones; the .npz all
  monkeypatch.setattr(generate, "GRID_COLUMNS", 1)
  msgs = []
  out = generate.sample_from_run(workdir, str(tmp_path / "cap.png"), **dict(kw, log=msgs.append))
  np.testing.assert_allclose(out, gen(state.ema_params), atol=1e-4)
  with np.load(tmp_path / "cap.npz") as f:
    assert f["images"].shape == (4, 28, 28, 1)
  grid = np.asarray(Image.open(tmp_path / "cap.png"))
  assert grid.shape[:2] == (2 * 30, 30)  # 2 classes x 1 column
  np.testing.assert_array_equal(grid.reshape(2 * 30, 30, -1)[:, :, :1],
                                generate.image_grid(out[::2], rows=2))
  assert "(the first 1 per class)" in msgs[-1], msgs
  assert not [m for m in msgs if "NaN" in m], msgs
  monkeypatch.undo()
  # a sampler that diverged on some samples: said, kept in the .npz, black in the grid
  real = generate.generate_images
  def diverging(*args, **kwargs):
    images = real(*args, **kwargs)
    images[1, 3, 4, 0], images[2] = np.nan, np.inf
    return images
  monkeypatch.setattr(generate, "generate_images", diverging)
  msgs = []
  out = generate.sample_from_run(workdir, str(tmp_path / "nan.png"), **dict(kw, log=msgs.append))
  warned = [m for m in msgs if m.startswith("warning:")]
  assert len(warned) == 1 and "2 of 4 samples have NaN or infinite pixels" in warned[0], msgs
  assert "indices [1, 2], classes [1, 3]" in warned[0], warned
  with np.load(tmp_path / "nan.npz") as f:
    assert np.isnan(f["images"][1, 3, 4, 0]) and np.isposinf(f["images"][2]).all()
  grid = generate.image_grid(out, rows=2)
  assert grid[1 + 3, 30 + 1 + 4, 0] == 0  # sample 1 is class 3's second: row 0, column 1
  monkeypatch.undo()
  # an .npz write cut short keeps the old file and leaves no part behind
  (tmp_path / "keep.npz").write_bytes(b"10k samples")
  def cut_short(f, **arrays):
    f.write(b"half")
    raise OSError("disk full")
  monkeypatch.setattr(generate.np, "savez", cut_short)
  with pytest.raises(OSError, match="disk full"):
    generate.sample_from_run(workdir, str(tmp_path / "keep.npz"), overwrite=True, **kw)
  assert (tmp_path / "keep.npz").read_bytes() == b"10k samples"
  assert not [n for n in os.listdir(tmp_path) if n.endswith(".part")]


def test_sample_with_another_run_below_a_sigma(trained_run, tmp_path):
  # --low_noise_workdir: the other run's EMA denoiser at sigma <= switch_sigma. Here
  # the same run's EMA weights below the raw ones above (two different denoisers):
  # a switch above sigma_max is the low run alone, one below sigma_min this run
  # alone, and one between is neither; the .npz records the other run.
  workdir, _ = trained_run
  kw = dict(num_steps=3, classes=[3, 1], num_per_class=2, seed=1, batch_size=4,
            log=lambda s: None)
  raw = generate.sample_from_run(workdir, str(tmp_path / "raw.png"), use_ema=False, **kw)
  ema = generate.sample_from_run(workdir, str(tmp_path / "ema.png"), **kw)
  differ = lambda a, b: np.abs(a - b).max() > 0.05
  assert differ(raw, ema)  # 10 steps: the EMA still lags
  hybrid = lambda s, name: generate.sample_from_run(
      workdir, str(tmp_path / name), use_ema=False, low_noise_workdir=workdir,
      switch_sigma=s, **kw)
  # (1e-3: another program, float32 sums in another order along a chaotic sampler)
  np.testing.assert_allclose(hybrid(80.0, "all_low.png"), ema, atol=1e-3)
  np.testing.assert_allclose(hybrid(1e-3, "all_high.png"), raw, atol=1e-3)
  mid = hybrid(1.0, "mid.png")
  assert differ(mid, raw) and differ(mid, ema)
  with np.load(tmp_path / "mid.npz") as f:
    assert str(f["low_noise_workdir"]) == os.path.abspath(workdir)
    assert int(f["low_noise_step"]) == 10 and float(f["switch_sigma"]) == 1.0
  with np.load(tmp_path / "raw.npz") as f:
    assert "switch_sigma" not in f.files
  with pytest.raises(ValueError, match="low_noise_workdir and switch_sigma go together"):
    generate.sample_from_run(workdir, str(tmp_path / "x.png"), low_noise_workdir=workdir, **kw)
  # and from the command line, the same images, the other run named in the last line
  proc = run("sample.py", "--workdir", workdir, "--noema", "--num_steps", "3",
             "--classes", "3,1", "--num_per_class", "2", "--seed", "1", "--batch_size", "4",
             "--low_noise_workdir", workdir, "--switch_sigma", "1", "--out",
             str(tmp_path / "cli.png"))
  np.testing.assert_allclose(np.load(str(tmp_path / "cli.npz"))["images"], mid, atol=1e-3)
  assert f"at sigma <= 1: {workdir} step 10 (EMA weights)" in proc.stdout, proc.stdout


def test_check_low_noise_run_names_what_differs():
  from configs import cifar10, mnist, mnist_latent
  base = mnist.get_config()
  run_config.check_low_noise_run(base, mnist.get_config(), 0.3)  # the same kind: fine
  other = mnist.get_config()
  other.model.conditioner.n_classes = 5
  for low, switch, message in (
      (mnist.get_config(), 0.0, "switch_sigma must be > 0"),
      (cifar10.get_config(), 0.3, "makes images of shape (32, 32, 3), this run (28, 28, 1)"),
      (other, 0.3, "has 5 classes, this run 10"),
      (mnist_latent.get_config(), 0.3, "in an autoencoder's latents")):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
      run_config.check_low_noise_run(base, low, switch, "B")


def run_noting_jax(script, *args):
  """Runs ``script`` as ``python script args`` does and returns the process
  and whether JAX had been imported by its exit."""
  probe = ("import atexit, runpy, sys\n"
           "atexit.register(lambda: print('JAX_IMPORTED', 'jax' in sys.modules, flush=True))\n"
           f"sys.argv[0] = {script!r}\n"
           f"runpy.run_path({script!r}, run_name='__main__')\n")
  proc = subprocess.run([sys.executable, "-c", probe, *map(str, args)], cwd=ROOT,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"), capture_output=True,
                        text=True, timeout=120)
  assert "JAX_IMPORTED" in proc.stdout, (proc.stdout, proc.stderr[-1000:])
  return proc, "JAX_IMPORTED True" in proc.stdout


def test_sample_flags_are_checked_before_jax_is_imported(tmp_path):
  # A mistyped flag is told at once: no JAX start-up before the one-line error.
  for bad, message in ((["--classes=1,a"], "--classes takes integer labels"),
                       (["--classes="], "--classes is empty"),
                       (["--batch_size", "0"], "--batch_size must be >= 1"),
                       (["--cfg_interval=5,0.3"], "0 <= lo < hi"),
                       (["--score_scale", "0", "--score_scale_interval=0.1,1"],
                        "--score_scale must be a finite number > 0"),
                       (["--score_scale", "2", "--score_scale_interval=1,0.1"],
                        "--score_scale_interval needs 0 <= lo < hi"),
                       (["--average_from", "5", "--ema"], "drop --ema"),
                       (["--switch_sigma", "0.3"], "--low_noise_workdir and --switch_sigma go together"),
                       (["--low_noise_step", "5"], "--low_noise_step is a step of --low_noise_workdir")):
    proc, jax_imported = run_noting_jax("sample.py", "--workdir", tmp_path, "--out",
                                        tmp_path / "x.png", *bad)
    assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-1000:]
    assert not jax_imported, (bad, proc.stderr[-1000:])


def test_sample_score_scale_interval_alone_is_refused_before_jax_on_an_unscaled_run(tmp_path):
  # the interval says where the run's scale applies; the run's scale is 1 (none)
  import json
  os.makedirs(tmp_path / "run" / "configs")
  with open(tmp_path / "run" / "configs" / "2026-12-05T00-00-00-config.json", "w") as f:
    json.dump({"model": {}}, f)
  proc, jax_imported = run_noting_jax("sample.py", "--workdir", tmp_path / "run", "--out",
                                      tmp_path / "x.png", "--score_scale_interval=0.1,1")
  assert proc.returncode != 0 and not jax_imported
  assert "the run's sampling.score_scale is 1 (none): pass --score_scale S" in proc.stderr, (
      proc.stderr[-1000:])


def test_run_config_classes_are_some_of_the_runs_own():
  import ml_collections
  config = ml_collections.ConfigDict({"model": {"conditioner": {"n_classes": 10}}})
  assert run_config.classes(config) == list(range(10))
  assert run_config.classes(config, (3, 0, 9)) == [3, 0, 9]
  # a negative label indexes the embedding table from the end: refused as 10 is
  with pytest.raises(ValueError, match=r"classes \[-1, 10\] are outside 0..9"):
    run_config.classes(config, [-1, 3, 10])
  with pytest.raises(ValueError, match="classes is empty: name at least one class"):
    run_config.classes(config, [])


def test_run_config_data_flags_default_to_the_runs_own_data():
  import ml_collections
  run = lambda name: ml_collections.ConfigDict(
      {"data": {"name": name, "source": "tfds", "data_dir": "/runs/data"}})
  # neither flag given: where the run's data came from
  assert run_config.data_flags(run("mnist"), "offline", None, False) == ("tfds", "/runs/data")
  # either given: the flags, as they are
  assert run_config.data_flags(run("mnist"), "offline", "/mine", True) == ("offline", "/mine")
  assert run_config.data_flags(run("mnist"), "tfds", None, True) == ("tfds", None)
  # a synthetic run's data are no data set to score on: the flags' defaults
  assert run_config.data_flags(run("synthetic"), "offline", None, False) == ("offline", None)
