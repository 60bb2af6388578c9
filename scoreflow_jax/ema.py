"""Exponential moving average of parameters with sgm's LitEma rule."""
import jax
import jax.numpy as jnp


def ema_update(shadow, params, num_updates, decay=0.9999):
  """One LitEma step over pytrees.

  The counter is incremented first, then d = min(decay, (1 + n) / (10 + n)) and
  shadow <- shadow - (1 - d) (shadow - params). Returns
  ``(new_shadow, num_updates + 1)``. The warm-up makes early averages track
  the parameters closely (d = 2/11 on the first update).
  """
  num_updates = num_updates + 1

  def update(s, p):
    n = jnp.asarray(num_updates, s.dtype)  # the decay in each leaf's precision
    d = jnp.minimum(jnp.asarray(decay, s.dtype), (1.0 + n) / (10.0 + n))
    return s - (1.0 - d) * (s - p)

  return jax.tree.map(update, shadow, params), num_updates
