"""MNIST with a small conv flow on the per-class Gaussian-mixture base.

configs/mnist_conv_gauss.py (the conv flow: the image squeezed to 14x14x4,
affine couplings on channel halves whose coupling networks are residual CNNs
with FiLM by the sigma/class embedding) on the base of configs/mnist_mixture.py
(50 k-means components of rank 16 per class, fitted when the run starts,
frozen), with a flow small enough for a CPU: 4 couplings, 24 channels, 1
residual block each, and lr 2e-3 (200-step warm-up). The denoiser is the
mixture's exact posterior mean plus c_out times the gradient of the conv
flow's residual energy, so D = x + sigma^2 grad_x E still holds exactly. The
MLP flow on the same base plateaus at FD 41.2 (1k samples) with grainy
strokes; this one denoises held-out images 30-43% better at sigma 0.01-0.3 and
reaches FD 19.9 / 99.5% unguided at 1k after 45 minutes on 2 CPU cores at lr
3e-4 (5,868 steps; docs/results.md, "A conv flow on the mixture base"). A
higher lr gave a lower FD in every paired evaluation: 1e-3 below 6e-4 and
3e-4 at 3,000-3,400 steps with two training seeds (session 11), 2e-3 below
1e-3 with both seeds there and at 5,868 steps (2k mean FD 14.9 against 15.5,
99.65%; docs/results.md, sessions 11-12); 4e-3 was level with 2e-3 at 3,000
steps and worse at 5,868 (session 13), and a cosine decay to 0
(optim.schedule) was worse. Twice the steps (11,736) moved the FD by -0.2,
within noise. The raw weights (sample.py --noema) swing by 2.8 in FD between
checkpoints 200 steps apart (12.8-15.6 at steps 5,000-5,868) and a mean of
kept checkpoints (sample.py --average_from) scores about the mean of their
FDs, so sampling keeps the EMA (14.9; sessions 13-15).

Since session 34 the residual blocks apply their FiLM after the GroupNorm
(conv_scale_shift_norm, as sgm's use_scale_shift_norm; before it, the norm
removes the part of the FiLM common to a group's channels). Paired against
the legacy block trained beside it on the same code: lower FD in 3 of 3
evaluations at training seed 1 (3,400 steps, -0.36), 3 of 3 at seed 0 and
3,000 steps (-1.19), and 6 of 6 at seed 0 and 5,868 steps: 2k mean FD 14.40
against 14.95, 99.65% unguided (the legacy rerun reproduces session 12's
14.95), training loss 0.234 against 0.240 at steps 5,001-5,868, most of the
gain below sigma 0.1 (docs/results.md, "The conv blocks' FiLM before or
after their GroupNorm"). Runs saved before keep the legacy block (their
saved config says so).

Guided sampling (`sample.py --cfg_scale 1.5`, at every sigma) lowered a
3,000-step run's FD from 15.05 to 10.97 (6 of 6 paired evaluations,
session 39; 1.25: 11.63, 2: 12.73); CFG 3 on (2, 80] raised it to 19.75.
The same run at 5,868 steps: 14.62 unguided, 10.97 with CFG 1.5 (6 of 6,
session 40).
"""
from configs import mnist_conv_gauss


def get_config(arg=None):
  config = mnist_conv_gauss.get_config(arg)
  config.run_name = config.run_name.replace("mnist-conv-gauss", "mnist-conv-mixture", 1)
  sf = config.model.score_flow
  sf.gaussian_components = 50
  sf.gaussian_rank = 16
  sf.conv_scale_shift_norm = True  # FiLM after the blocks' GroupNorm (session 34)
  if arg != "tiny":  # the tiny config keeps its own (smaller) conv flow
    sf.n_flows = 4
    sf.conv_channels = 24
    sf.conv_blocks = 1
    config.optim.learning_rate = 2e-3
  return config
