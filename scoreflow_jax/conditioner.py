"""Conditioning: sgm's ClassEmbedder inside a GeneralConditioner.

Each embedder turns one batch entry (``input_key``) into an embedding; the
output's rank picks the key it is collected under ("vector" for 2-D,
"crossattn" for 3-D, "concat" for 4-D/5-D) and embeddings sharing a key are
concatenated (vector/concat on axis 1, crossattn on axis 2), exactly as
sgm's ``GeneralConditioner``.
"""
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

OUTPUT_DIM2KEYS = {2: "vector", 3: "crossattn", 4: "concat", 5: "concat"}
KEY2CATDIM = {"vector": 1, "crossattn": 2, "concat": 1}


class ClassEmbedder(nn.Module):
  """sgm's ClassEmbedder: a trainable table ``(n_classes, embed_dim)``.

  Returns (B, embed_dim), or (B, 1, embed_dim) with ``add_sequence_dim`` (then
  it lands in "crossattn"). The table is initialised N(0, 1) like
  ``torch.nn.Embedding``. sgm's own ``get_unconditional_conditioning`` for
  this class uses label ``n_classes - 1`` as "unconditional" (a quirk: for
  MNIST that is the digit 9); sgm's MNIST sampling instead zeroes the
  embedding (``force_uc_zero_embeddings=["cls"]``), which is what
  :meth:`GeneralConditioner.unconditional` does. A label outside
  [0, n_classes) embeds as NaN (a negative one too, not as a wrapped-around
  row), so a wrong label shows in the loss instead of training another class;
  the scripts check labels before they get here.
  """
  embed_dim: int
  n_classes: int = 1000
  add_sequence_dim: bool = False

  @nn.compact
  def __call__(self, c):
    c = jnp.asarray(c)
    if c.ndim != 1 or not jnp.issubdtype(c.dtype, jnp.integer):
      raise ValueError(f"class labels must be integers of shape (B,), got {c.dtype} "
                       f"{c.shape}")
    emb = nn.Embed(self.n_classes, self.embed_dim,
                   embedding_init=nn.initializers.normal(1.0),
                   name="embedding")(c)
    valid = (c >= 0) & (c < self.n_classes)
    emb = jnp.where(valid[..., None], emb, jnp.nan)
    if self.add_sequence_dim:
      emb = emb[:, None, :]
    return emb


class GeneralConditioner(nn.Module):
  """Runs each embedder on ``batch[input_key]`` and collects the outputs.

  Classifier-free-guidance dropout: each embedder with ``ucg_rate > 0``
  multiplies each sample's embedding by Bernoulli(1 - ucg_rate), drawn from
  ``key`` (folded with the embedder's index). ``key`` is one typed key, or a
  (B,) array of typed keys, one per sample (then each sample's draw is
  independent of how the batch is split over devices). Without ``key`` no
  dropout is applied (evaluation). Embedders named in ``force_zero_embeddings`` (by their
  input key) return zeros, sgm's ``force_zero_embeddings``.

  ``class_index_key``: also return that input's integer labels as
  ``"class_index"`` (B,), with ``n_classes`` of its embedder where the
  embedding was dropped or forced to zero (the slot of the unconditional
  model, for networks that need the class itself: ScoreFlowNetwork's
  gaussian_base). Not part of sgm's conditioner.
  """
  embedders: Sequence[nn.Module]
  input_keys: Sequence[str]
  ucg_rates: Sequence[float]
  class_index_key: Optional[str] = None

  def __call__(self, batch, key: Optional[jax.Array] = None,
               force_zero_embeddings: Sequence[str] = ()):
    if not len(self.embedders) == len(self.input_keys) == len(self.ucg_rates):
      raise ValueError("embedders, input_keys and ucg_rates must have one entry "
                       "per embedder")
    if key is not None and not jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
      key = jax.random.wrap_key_data(key)  # a raw jax.random.PRNGKey (uint32 words)
    output = {}
    for i, (embedder, input_key, rate) in enumerate(
        zip(self.embedders, self.input_keys, self.ucg_rates)):
      if input_key not in batch:
        raise KeyError(f"conditioner input {input_key!r} is missing from the "
                       f"batch (keys: {sorted(batch)})")
      emb = embedder(batch[input_key])
      kept = jnp.ones((emb.shape[0],), bool)
      if emb.ndim not in OUTPUT_DIM2KEYS:
        raise ValueError(f"embedder for {input_key!r} returned rank {emb.ndim}; "
                         "expected 2 (vector), 3 (crossattn) or 4/5 (concat)")
      out_key = OUTPUT_DIM2KEYS[emb.ndim]
      if rate > 0.0 and key is not None:
        if key.ndim == 0:
          keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1.0 - rate,
                                      (emb.shape[0],))
        else:
          if key.shape != (emb.shape[0],):  # (1,) would broadcast: one draw for all
            raise ValueError(f"key holds {key.shape} keys for {emb.shape[0]} samples: "
                             "give one key, or one per sample")
          keep = jax.vmap(lambda k: jax.random.bernoulli(
              jax.random.fold_in(k, i), 1.0 - rate))(key)
        emb = keep.astype(emb.dtype).reshape((-1,) + (1,) * (emb.ndim - 1)) * emb
        kept = keep
      if input_key in force_zero_embeddings:
        emb = jnp.zeros_like(emb)
        kept = jnp.zeros_like(kept)
      if input_key == self.class_index_key:
        output["class_index"] = jnp.where(
            kept, jnp.asarray(batch[input_key], jnp.int32), embedder.n_classes)
      if out_key in output:
        output[out_key] = jnp.concatenate([output[out_key], emb],
                                          axis=KEY2CATDIM[out_key])
      else:
        output[out_key] = emb
    return output

  def unconditional(self, batch_c, batch_uc=None,
                    force_uc_zero_embeddings: Sequence[str] = (),
                    force_cond_zero_embeddings: Sequence[str] = ()):
    """sgm's ``get_unconditional_conditioning``: ``(c, uc)`` without dropout."""
    c = self(batch_c, None, force_cond_zero_embeddings)
    uc = self(batch_c if batch_uc is None else batch_uc, None,
              force_uc_zero_embeddings)
    return c, uc


def class_conditioner(embed_dim: int, n_classes: int, ucg_rate: float,
                      input_key: str = "cls", add_sequence_dim: bool = False,
                      class_index: bool = False):
  """The MNIST/CIFAR conditioner: one ClassEmbedder reading ``batch["cls"]``
  (and its labels as ``"class_index"`` with ``class_index=True``)."""
  if not 0.0 <= ucg_rate < 1.0:
    raise ValueError(f"ucg_rate must be in [0, 1), got {ucg_rate}")
  return GeneralConditioner(
      embedders=(ClassEmbedder(embed_dim, n_classes, add_sequence_dim),),
      input_keys=(input_key,), ucg_rates=(ucg_rate,),
      class_index_key=input_key if class_index else None)
