"""GeneralConditioner + ClassEmbedder: routing, concatenation, CFG dropout."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from scoreflow_jax import conditioner as cm


def test_class_embedder_to_vector_and_table_lookup():
  cond = cm.class_conditioner(embed_dim=6, n_classes=10, ucg_rate=0.0)
  batch = {"cls": jnp.asarray([3, 0, 3])}
  params = cond.init(jax.random.key(0), batch)
  out = cond.apply(params, batch)
  assert set(out) == {"vector"}
  assert out["vector"].shape == (3, 6)
  table = params["params"]["embedders_0"]["embedding"]["embedding"]
  np.testing.assert_array_equal(out["vector"], table[np.array([3, 0, 3])])
  # N(0, 1) init like torch.nn.Embedding
  assert 0.7 < float(jnp.std(table)) < 1.3


def test_labels_outside_the_table_embed_as_nan():
  # nn.Embed alone wraps -1 around to the last class (training it silently)
  cond = cm.class_conditioner(embed_dim=4, n_classes=10, ucg_rate=0.0)
  batch = {"cls": jnp.asarray([-1, 3, 10, 9])}
  params = cond.init(jax.random.key(0), batch)
  out = np.asarray(cond.apply(params, batch)["vector"])
  assert np.all(np.isnan(out[[0, 2]])) and np.all(np.isfinite(out[[1, 3]]))
  # (B, 1) labels would have embedded as (B, 1, D) and gone to "crossattn"
  for bad in (jnp.asarray([[3], [1]]), jnp.asarray([3.0, 1.0])):
    with pytest.raises(ValueError, match="class labels must be integers of shape"):
      cond.apply(params, {"cls": bad})


def test_keys_by_rank_and_concatenation():
  cond = cm.GeneralConditioner(
      embedders=(cm.ClassEmbedder(4, 5), cm.ClassEmbedder(3, 5),
                 cm.ClassEmbedder(2, 5, add_sequence_dim=True),
                 cm.ClassEmbedder(5, 5, add_sequence_dim=True)),
      input_keys=("a", "b", "a", "b"), ucg_rates=(0.0, 0.0, 0.0, 0.0))
  batch = {"a": jnp.asarray([1, 2]), "b": jnp.asarray([0, 4])}
  params = cond.init(jax.random.key(0), batch)
  out = cond.apply(params, batch)
  assert out["vector"].shape == (2, 7)       # concatenated on axis 1
  assert out["crossattn"].shape == (2, 1, 7)  # concatenated on axis 2
  t0 = params["params"]["embedders_0"]["embedding"]["embedding"]
  t1 = params["params"]["embedders_1"]["embedding"]["embedding"]
  np.testing.assert_array_equal(out["vector"][:, :4], t0[np.array([1, 2])])
  np.testing.assert_array_equal(out["vector"][:, 4:], t1[np.array([0, 4])])


def test_ucg_dropout_rate_and_whole_sample():
  cond = cm.class_conditioner(embed_dim=8, n_classes=10, ucg_rate=0.2)
  n = 20000
  batch = {"cls": jnp.asarray(np.arange(n) % 10)}
  params = cond.init(jax.random.key(0), batch)
  out = cond.apply(params, batch, key=jax.random.key(1))["vector"]
  zero_rows = np.all(np.asarray(out) == 0, axis=1)
  nonzero_entries = np.any(np.asarray(out) == 0, axis=1)
  np.testing.assert_array_equal(zero_rows, nonzero_entries)  # all-or-nothing per sample
  assert abs(zero_rows.mean() - 0.2) < 0.015  # 5 sigma of a Binomial(20000, .2)
  # one key per sample (the train step's way): the same rate, each sample its own draw
  keys = jax.random.split(jax.random.key(4), n)
  per_key = np.all(np.asarray(cond.apply(params, batch, key=keys)["vector"]) == 0, axis=1)
  assert abs(per_key.mean() - 0.2) < 0.015
  assert not np.array_equal(per_key, zero_rows)
  # different keys drop different samples; no key means no dropout
  out2 = cond.apply(params, batch, key=jax.random.key(2))["vector"]
  assert not np.array_equal(np.all(np.asarray(out2) == 0, 1), zero_rows)
  assert not np.any(np.all(np.asarray(cond.apply(params, batch)["vector"]) == 0, 1))
  # a raw (legacy) key, one or one per sample, is the typed key of its words
  raw = jax.random.PRNGKey(1)
  np.testing.assert_array_equal(cond.apply(params, batch, key=raw)["vector"],
                                cond.apply(params, batch, key=jax.random.wrap_key_data(raw))["vector"])
  per_sample = jax.random.split(jax.random.key(3), 8)
  small = {"cls": batch["cls"][:8]}
  np.testing.assert_array_equal(
      cond.apply(params, small, key=jax.random.key_data(per_sample))["vector"],
      cond.apply(params, small, key=per_sample)["vector"])
  # one key in an array of one would broadcast a single draw over the batch
  with pytest.raises(ValueError, match=r"key holds \(1,\) keys for 8 samples"):
    cond.apply(params, small, key=per_sample[:1])


def test_unconditional_zero_embeddings():
  cond = cm.class_conditioner(embed_dim=4, n_classes=10, ucg_rate=0.5)
  batch = {"cls": jnp.asarray([1, 2, 3])}
  params = cond.init(jax.random.key(0), batch)
  c, uc = cond.apply(params, batch, force_uc_zero_embeddings=("cls",),
                     method="unconditional")
  np.testing.assert_array_equal(uc["vector"], 0.0)
  assert np.all(np.any(np.asarray(c["vector"]) != 0, axis=1))  # no dropout in c


def test_bad_inputs():
  with pytest.raises(ValueError, match="ucg_rate"):
    cm.class_conditioner(4, 10, 1.5)
  cond = cm.class_conditioner(4, 10, 0.0)
  with pytest.raises(KeyError, match="cls"):
    cond.init(jax.random.key(0), {"label": jnp.zeros(2, jnp.int32)})


def test_each_embedder_draws_its_own_dropout():
  cond = cm.GeneralConditioner(embedders=(cm.ClassEmbedder(4, 10), cm.ClassEmbedder(4, 10)),
                               input_keys=("a", "b"), ucg_rates=(0.5, 0.5))
  n = 256
  batch = {"a": jnp.arange(n) % 10, "b": jnp.arange(n) % 10}
  params = cond.init(jax.random.key(0), batch)
  for key in (jax.random.key(1), jax.random.split(jax.random.key(1), n)):  # one, per sample
    v = np.asarray(cond.apply(params, batch, key=key)["vector"])
    drop_a, drop_b = np.all(v[:, :4] == 0, 1), np.all(v[:, 4:] == 0, 1)
    assert 0.35 < drop_a.mean() < 0.65 and 0.35 < drop_b.mean() < 0.65
    assert not np.array_equal(drop_a, drop_b)  # independent draws


def test_unconditional_embeds_batch_uc():
  # sgm: uc = self(batch_c if batch_uc is None else batch_uc, ...)
  cond = cm.class_conditioner(embed_dim=4, n_classes=10, ucg_rate=0.5, class_index=True)
  batch_c, batch_uc = {"cls": jnp.asarray([1, 2, 3])}, {"cls": jnp.asarray([7, 0, 9])}
  params = cond.init(jax.random.key(0), batch_c)
  table = np.asarray(params["params"]["embedders_0"]["embedding"]["embedding"])
  c, uc = cond.apply(params, batch_c, batch_uc, method="unconditional")
  np.testing.assert_array_equal(c["vector"], table[[1, 2, 3]])
  np.testing.assert_array_equal(uc["vector"], table[[7, 0, 9]])
  np.testing.assert_array_equal(uc["class_index"], [7, 0, 9])
  _, uc_same = cond.apply(params, batch_c, method="unconditional")
  np.testing.assert_array_equal(uc_same["vector"], table[[1, 2, 3]])
