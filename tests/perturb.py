"""Test helper: model parameters moved off their initialisation."""
import jax


def perturb(params, key, scale, dtype=None):
  """``params`` (cast to ``dtype`` when given) + ``scale`` * N(0, 1) drawn in
  each leaf's dtype, with a key of its own split from ``key``. The flows
  zero-initialise their coupling outputs, so at init a flow is the identity and
  neither class nor sigma matters; a little noise makes a non-trivial flow."""
  leaves, tree = jax.tree.flatten(params)
  if dtype is not None:
    leaves = [l.astype(dtype) for l in leaves]
  keys = jax.random.split(key, len(leaves))
  return jax.tree.unflatten(tree, [l + scale * jax.random.normal(k, l.shape, l.dtype)
                                   for l, k in zip(leaves, keys)])
