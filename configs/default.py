"""Every config field with its default. Other configs import this and override.

Run: python train.py --config configs/mnist.py --config.training.batch_size=64
"""
import ml_collections


def get_config():
  config = ml_collections.ConfigDict()
  config.run_name = "default"            # the run folder is logs/<timestamp>-<run_name>
  config.seed = 0                        # one key for init, data order and noise

  config.data = data = ml_collections.ConfigDict()
  data.name = "mnist"                    # mnist | cifar10 | synthetic
  data.source = "tfds"                   # tfds | offline (a directory of the original files)
  data.data_dir = ml_collections.config_dict.placeholder(str)  # tfds data_dir, or the offline directory
  data.split = "train"                   # split to train on
  data.holdout = 0                       # training images held out as the "validation" split (a fixed choice; 0: none)
  data.num_examples = 1024               # synthetic only: how many examples to make
  data.image_size = 28                   # synthetic only: image height and width
  data.channels = 1                      # synthetic only: image channels
  data.prefetch = 2                      # batches prepared ahead by a background thread

  config.model = model = ml_collections.ConfigDict()
  model.first_stage = "identity"         # identity (diffusion on pixels) | kl_autoencoder (on the latents of model.autoencoder)
  model.autoencoder = ae = ml_collections.ConfigDict()  # first_stage=kl_autoencoder: sgm's AutoencoderKL, frozen; defaults: SDXL's VAE (sd_xl_base.yaml)
  ae.weights = ml_collections.config_dict.placeholder(str)  # its state dict in sgm/ldm naming, .safetensors or .npz (e.g. sdxl_vae.safetensors, or a whole sgm checkpoint)
  ae.sha256 = ""                         # filled in by train.py: the weights the run trained with (checked whenever the run is loaded)
  ae.scale_factor = 0.13025              # DiffusionEngine.scale_factor: diffusion runs on scale_factor * z; SDXL's (SD 1.x/2.x: 0.18215) gives unit-variance latents, for model.sigma_data=1 (halve it for 0.5)
  ae.shift_factor = 0.0                  # diffusion runs on scale_factor * (z - shift_factor): shift_factor the latents' mean, as for SD3's and FLUX's VAEs (sgm's DiffusionEngine has no shift: 0)
  ae.sample_posterior = True             # training latents drawn from the posterior, as sgm's AutoencoderKL (False: its mean)
  ae.cache_moments = True                # encode the training set once at the start and draw each step's latents from the stored posterior (mean, logvar): sgm's per-step encode without the encoder's cost, kept in WORKDIR/latent_moments.npy for a resume (False: encode every batch)
  ae.in_channels = 3                     # image channels (the decoder gives as many)
  ae.embed_dim = 4                       # latent channels: the network's in_channels
  ae.z_channels = 4
  ae.ch = 128                            # base width (a multiple of 32: GroupNorm(32))
  ae.ch_mult = (1, 2, 4, 4)              # width per level; each level but the last halves H, W
  ae.num_res_blocks = 2
  ae.attn_resolutions = ()               # nominal sizes (resolution / 2^level) with attention blocks
  ae.resolution = 256                    # the nominal input size attn_resolutions refers to
  model.sigma_data = 0.5                 # EDMScaling(sigma_data) of the Denoiser
  model.network = "score_flow"           # score_flow | unet
  model.score_flow = sf = ml_collections.ConfigDict()
  sf.in_channels = 1                     # image channels
  sf.model_channels = 128                # embedding and coupling-MLP width
  sf.n_flows = 3                         # affine coupling layers
  sf.activation = "softplus"             # smooth activation of the coupling MLPs
  sf.parameterization = "preconditioned" # preconditioned | seed (the reference design) | density (exact likelihood)
  sf.flow_type = "joint"                 # joint: flow over [x, embeddings] | joint_context: the same, embeddings also fed to every coupling | conditional: over x, embeddings as context | conv: image flow, CNN couplings
  sf.conv_channels = 64                  # conv flow only: width of the coupling CNNs
  sf.conv_blocks = 2                     # conv flow only: residual blocks per coupling CNN
  sf.conv_global = False                 # conv flow only: FiLM also sees the image's spatial mean
  sf.conv_scale_shift_norm = False       # conv flow only: FiLM after the block's second GroupNorm (sgm's use_scale_shift_norm); False: before it, which normalises away the FiLM's part common to a group's channels (flows.ConvCouplingNet)
  sf.max_log_scale = 1.0                 # coupling log-scales bounded by m tanh(raw / m) (1: the reference design)
  sf.energy_scale = False                # learnt per-(sigma, class) temperature exp(tau) of the energy (not with density)
  sf.energy_weights = False              # signed per-feature weights a(sigma, class) of |z|^2 in the energy (not with density)
  sf.energy_linear = False               # linear term <b(sigma, class), x> in the energy (not with density)
  sf.gaussian_base = False               # preconditioned: denoiser = per-class Gaussian posterior mean (fitted to the data) + residual flow energy gradient; density: that noisy Gaussian (mixture) is the flow's base distribution
  sf.gaussian_rank = 64                  # gaussian_base: principal directions per class (per component)
  sf.gaussian_components = 1             # gaussian_base: k-means mixture components per class (1: one Gaussian)
  sf.gaussian_covariance_prior = 0.0     # gaussian_components > 1: pseudo-observations of the class's pooled covariance in each component's (0: none; 30 lowered the held-out loss and raised FD: docs/results.md)
  sf.score_head = True                   # seed only: the reference design's score MLP
  sf.dtype = "float32"                   # matmul dtype of the couplings: float32 | bfloat16
  model.unet = unet = ml_collections.ConfigDict()  # sgm's openaimodel.UNetModel; defaults: sgm's toy mnist_cond.yaml
  unet.in_channels = 1                   # image channels (the output has as many)
  unet.model_channels = 32               # base width; the time/label embedding is 4x this
  unet.num_res_blocks = 4                # ResBlocks per level (one more on the way up)
  unet.channel_mult = (1, 2, 2)          # width multiplier per level; all but the last halve H, W
  unet.attention_resolutions = ()        # downsample rates with a SpatialTransformer per ResBlock
  unet.num_head_channels = 32            # channels per attention head
  unet.transformer_depth = 1             # transformer blocks per SpatialTransformer
  unet.disable_middle_transformer = False  # True: no SpatialTransformer in the middle block
  unet.num_groups = 32                   # GroupNorm groups (sgm fixes 32); must divide model_channels
  model.conditioner = cond = ml_collections.ConfigDict()
  cond.embed_dim = 512                   # ClassEmbedder width (the network's adm "vector" width)
  cond.n_classes = 10                    # number of labels
  cond.ucg_rate = 0.2                    # classifier-free-guidance label dropout

  config.loss = loss = ml_collections.ConfigDict()
  loss.type = "l2"                       # l2 | l1 (StandardDiffusionLoss)
  loss.sigma_data = 0.5                  # EDMWeighting(sigma_data)
  loss.p_mean = -1.2                     # EDMSampling: log sigma ~ N(p_mean, p_std^2)
  loss.p_std = 1.2
  loss.nll_weight = 0.0                  # > 0: add this times the exact bits/dim of the
                                         # dequantised batch under q(x | nll_sigma, c) to
                                         # each sample's loss (parameterization 'density' only;
                                         # mnist_density.py: 0.003)
  loss.nll_sigma = 0.002                 # the noise level of that density (bits_per_dim.py's --sigma)
  loss.nll_sigma_max = 0.0               # > nll_sigma: each sample's term at its own sigma,
                                         # log-uniform over [nll_sigma, nll_sigma_max] (0: off)
  loss.nll_noisy = False                 # the term scores x + u + sigma * noise, the noisy data
                                         # q(. | sigma) models (False: the clean x + u)

  config.optim = optim = ml_collections.ConfigDict()
  optim.learning_rate = 1e-4             # AdamW peak learning rate (sgm's base_learning_rate)
  optim.weight_decay = 0.01              # torch.optim.AdamW's default, as sgm uses
  optim.b1 = 0.9
  optim.b2 = 0.999
  optim.eps = 1e-8
  optim.warmup_steps = 0                 # linear warmup from 0 (0: none)
  optim.schedule = "constant"            # after warm-up: constant | cosine (decays over
                                         # training.num_steps: resuming with a larger
                                         # num_steps stretches it; the trainer warns)
  optim.final_lr_fraction = 0.0          # cosine: the rate at num_steps, as a fraction
  optim.grad_clip_norm = 0.0             # global-norm clipping (0: off)

  config.ema = ema = ml_collections.ConfigDict()
  ema.decay = 0.9999                     # LitEma decay (with its (1+n)/(10+n) warm-up)
  ema.posthoc_stds = ()                  # sigma_rel of power-function EMAs to track for
                                         # post-hoc EMA (EDM2: (0.05, 0.1); sample.py
                                         # --posthoc_ema); snapshots: the kept checkpoints

  config.training = training = ml_collections.ConfigDict()
  training.batch_size = 128              # global batch, split over all devices of all processes
  training.num_steps = 20_000            # total optimisation steps
  training.log_every = 100               # metrics to TensorBoard and the progress line
  training.checkpoint_every = 1000       # latest checkpoint (also written at the end)
  training.keep_every = 5000             # checkpoints at multiples of this are kept for good (0: none)
  training.max_to_keep = 2               # other checkpoints kept
  training.image_every = 1000            # EMA sample grid to images/train (0: off)
  training.images_per_class = 8          # grid columns; one row per class
  training.time_limit_s = 0.0            # stop (with a checkpoint) this long after the start (0: none);
                                         # data loading, the base fit and compilation count;
                                         # the steps since the last log are logged and checked first;
                                         # a last grid (image_every > 0) follows the save

  config.sampling = sampling = ml_collections.ConfigDict()
  sampling.sampler = "heun_edm"          # euler_edm | heun_edm | euler_ancestral | dpmpp_2s_ancestral | dpmpp_2m | lms
  sampling.num_steps = 18                # sampler steps (EDM discretization)
  sampling.sigma_min = 0.002
  sampling.sigma_max = 80.0
  sampling.rho = 7.0
  sampling.cfg_scale = 1.0               # 1.0: no guidance (one denoiser call per step)
  sampling.score_scale = 1.0             # the score times this where lo < sigma <= hi of
                                         # score_scale_interval: a lower temperature there,
                                         # still an exact energy gradient (1.0: none; on (0.1, 1]
                                         # 1.5-2 lowered the pixel flows' FD by a quarter to a
                                         # third, 1.5 the latent conv flow's, where 2 raised it:
                                         # choose per model, bench/score_scale_sweep.py;
                                         # docs/results.md sessions 46-47; sample.py --score_scale)
  sampling.score_scale_interval = (0.1, 1.0)
  sampling.batch_size = 256              # images per sampler call
  return config


def is_tiny(arg) -> bool:
  """The variant after the file name (``configs/x.py:tiny``); refuses unknown ones."""
  if arg not in (None, "", "tiny"):
    raise ValueError(f"unknown config variant {arg!r}: the configs take none or "
                     "':tiny' (e.g. --config configs/mnist.py:tiny)")
  return arg == "tiny"


def tiny(config):
  """Shrinks a config to seconds-long runs (tests, smoke checks); big_vision's runlocal idea."""
  config.run_name = config.run_name + "-tiny"
  config.data.name = "synthetic"
  config.data.num_examples = 256
  config.data.prefetch = 0
  config.model.score_flow.model_channels = 16
  config.model.score_flow.n_flows = 2
  config.model.conditioner.embed_dim = 16
  config.training.batch_size = 16
  config.training.num_steps = 20
  config.training.log_every = 5
  config.training.checkpoint_every = 10
  config.training.keep_every = 0
  config.training.image_every = 10
  config.training.images_per_class = 2
  config.sampling.num_steps = 4
  config.sampling.batch_size = 32
  config.optim.learning_rate = 1e-3
  return config
