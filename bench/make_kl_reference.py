"""Writes the sgm KL-autoencoder reference that tests check the Flax port against.

Builds a tiny AutoencoderKL (sgm's Encoder, Decoder, quant_conv,
post_quant_conv, named as in sgm's AutoencodingEngineLegacy) in float64 with
weights from tests/kl_weights.py, and saves its outputs on fixed inputs. Needs
PyTorch and a checkout of Stability-AI/generative-models (imported, not copied):

  python bench/make_kl_reference.py --sgm_path /path/to/generative-models

Saves (NCHW, float64): x, z, h = encoder(x), moments = quant_conv(h), the
posterior's mean, logvar (clamped as sgm does) and kl(), and
decoded = decoder(post_quant_conv(z)); plus names, shapes (JSON), config
(JSON) and torch_version.
"""
import argparse
import json
import os
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DDCONFIG = dict(double_z=True, z_channels=4, resolution=16, in_channels=3,
                out_ch=3, ch=32, ch_mult=[1, 2], num_res_blocks=1,
                attn_resolutions=[8], dropout=0.0)
EMBED_DIM = 4


def build(torch, model_lib):
  """The AutoencodingEngineLegacy modules that carry weights, as one Module."""
  ae = torch.nn.Module()
  ae.encoder = model_lib.Encoder(**DDCONFIG)
  ae.decoder = model_lib.Decoder(**DDCONFIG)
  z_mult = 1 + DDCONFIG["double_z"]
  ae.quant_conv = torch.nn.Conv2d(z_mult * DDCONFIG["z_channels"],
                                  z_mult * EMBED_DIM, 1)
  ae.post_quant_conv = torch.nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1)
  return ae


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sgm_path", required=True,
                      help="checkout of Stability-AI/generative-models")
  parser.add_argument("--out", default="tests/data/sgm_kl_reference.npz")
  args = parser.parse_args()
  sys.path.insert(0, os.path.join(ROOT, "tests"))
  sys.path.insert(0, os.path.abspath(args.sgm_path))

  import torch
  import kl_weights
  from sgm.modules.diffusionmodules import model as model_lib
  from sgm.modules.distributions.distributions import (
      DiagonalGaussianDistribution)

  ae = build(torch, model_lib).double().eval()
  names_shapes = [(k, tuple(v.shape)) for k, v in ae.state_dict().items()]
  weights = kl_weights.deterministic_state_dict(names_shapes, seed=0)
  ae.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()},
                     strict=True)

  res = DDCONFIG["resolution"]
  z_res = res // 2 ** (len(DDCONFIG["ch_mult"]) - 1)
  x = np.random.default_rng(1).uniform(
      -1.0, 1.0, (2, DDCONFIG["in_channels"], res, res))
  z = np.random.default_rng(2).standard_normal((2, EMBED_DIM, z_res, z_res))
  with torch.no_grad():
    h = ae.encoder(torch.from_numpy(x))
    moments = ae.quant_conv(h)
    posterior = DiagonalGaussianDistribution(moments)
    kl = posterior.kl()
    decoded = ae.decoder(ae.post_quant_conv(torch.from_numpy(z)))

  outputs = dict(h=h, moments=moments, mean=posterior.mean,
                 logvar=posterior.logvar, kl=kl, decoded=decoded)
  outputs = {k: v.numpy().astype(np.float64) for k, v in outputs.items()}
  out = os.path.join(ROOT, args.out) if not os.path.isabs(args.out) else args.out
  os.makedirs(os.path.dirname(out), exist_ok=True)
  np.savez_compressed(
      out, names=np.array([n for n, _ in names_shapes]),
      shapes=json.dumps([list(s) for _, s in names_shapes]),
      config=json.dumps(dict(DDCONFIG, embed_dim=EMBED_DIM)),
      x=x, z=z, torch_version=torch.__version__, **outputs)

  n_params = sum(int(np.prod(s)) for _, s in names_shapes)
  print(f"{len(names_shapes)} tensors, {n_params} parameters -> {out}")
  for k, v in outputs.items():
    print(f"  {k:8s} {str(v.shape):16s} max|.| {np.abs(v).max():.6g}")


if __name__ == "__main__":
  main()
