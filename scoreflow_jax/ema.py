"""Moving averages of parameters: sgm's LitEma rule, and EDM2's power-function
EMA with its post-hoc reconstruction."""
import jax
import jax.numpy as jnp
import numpy as np


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


# Power-function EMA and its post-hoc reconstruction (Karras et al. 2024,
# "Analyzing and Improving the Training Dynamics of Diffusion Models", EDM2).
#
# A power-function EMA of exponent gamma weighs the raw weights of step tau by
# (gamma + 1) tau^gamma / t^(gamma + 1) at step t: a profile over [0, t] whose
# width relative to t, sigma_rel, is its standard deviation over t. Tracking
# a few of them during training and keeping snapshots lets any other sigma_rel
# (and any step) be reconstructed after training as a linear combination of
# the snapshots: the profiles are functions of tau with closed-form inner
# products, so the combination is a small least-squares solve.


def exp_to_std(gamma):
  """sigma_rel of the power profile with exponent ``gamma`` (EDM2 eq. 123)."""
  gamma = np.float64(gamma)
  return np.sqrt((gamma + 1) / (gamma + 2) ** 2 / (gamma + 3))


# gamma = 0 (a uniform average of all training so far) is the widest profile
# whose weights do not grow towards step 0.
MAX_STD = float(exp_to_std(0.0))


def std_to_exp(std):
  """The exponent gamma >= 0 whose profile has relative width ``std``: the
  largest real root of gamma^3 + 7 gamma^2 + (16 - s^-2) gamma + 12 - s^-2
  (EDM2 eq. 126), for 0 < std <= ``MAX_STD``."""
  std = np.asarray(std, np.float64)
  if np.any(std <= 0) or np.any(std > MAX_STD + 1e-12):
    raise ValueError(f"sigma_rel must be in (0, {MAX_STD:.4f}] (the widest, "
                     f"{MAX_STD:.4f}, averages all of training uniformly), got {std}")
  s2 = std.ravel() ** -2.0
  gamma = [np.roots([1.0, 7.0, 16.0 - s, 12.0 - s]).real.max() for s in s2]
  return np.asarray(gamma, np.float64).reshape(std.shape)


def power_ema_update(shadows, params, step, stds):
  """One update of a power-function EMA per ``stds`` entry.

  ``shadows``: a tuple of pytrees like ``params``, one per std; ``step`` the
  number of optimiser steps taken including the one that made ``params``
  (1 on the first update, which copies ``params``). Each shadow moves by
  shadow <- shadow - (1 - beta) (shadow - params), beta = (1 - 1/t)^(gamma + 1).
  """
  if len(shadows) != len(stds):
    raise ValueError(f"{len(shadows)} power EMAs in the state but {len(stds)} stds "
                     f"({tuple(stds)}): the state was made for other ema.posthoc_stds")
  t = jnp.asarray(step, jnp.float32)
  out = []
  for shadow, gamma in zip(shadows, std_to_exp(np.asarray(stds, np.float64))):
    # the step's weight 1 - beta = -expm1((gamma + 1) log1p(-1/t)): exactly 1 at
    # t = 1, and to float32's relative precision at any t (1 - beta rounded
    # in float32 was off by 0.1% at t = 1.2e6 and 2.4% at 1e7)
    weight = -jnp.expm1((float(gamma) + 1.0) * jnp.log1p(-1.0 / t))

    def update(s, p, weight=weight):
      return s - weight.astype(s.dtype) * (s - p)

    out.append(jax.tree.map(update, shadow, params))
  return tuple(out)


def power_profile_inner(a_t, a_std, b_t, b_std):
  """Inner product over tau of the power profiles (a_t, a_std) and (b_t,
  b_std), each normalised to unit integral (EDM2 eq. 151); broadcasts."""
  a_t, b_t = np.asarray(a_t, np.float64), np.asarray(b_t, np.float64)
  a_exp, b_exp = std_to_exp(a_std), std_to_exp(b_std)
  ratio_exp = np.where(a_t < b_t, b_exp, -a_exp)
  num = (a_exp + 1) * (b_exp + 1) * (a_t / b_t) ** ratio_exp
  return num / ((a_exp + b_exp + 1) * np.maximum(a_t, b_t))


def posthoc_coefficients(in_t, in_std, out_t, out_std):
  """Weights x, one per snapshot, with sum_i x_i profile_i closest (in L2 over
  tau) to the profile (``out_t``, ``out_std``), and the relative error of that
  fit: ||sum_i x_i p_i - p_out|| / ||p_out||.

  ``in_t``/``in_std``: the step and sigma_rel of each snapshot (arrays of one
  length). The weights are rescaled to sum to 1, as EDM2 does, so a
  parameter every snapshot shares comes back unchanged.
  """
  in_t, in_std = np.broadcast_arrays(np.asarray(in_t, np.float64),
                                     np.asarray(in_std, np.float64))
  gram = power_profile_inner(in_t[:, None], in_std[:, None], in_t[None], in_std[None])
  rhs = power_profile_inner(in_t, in_std, out_t, out_std)
  x = np.linalg.lstsq(gram, rhs, rcond=None)[0]
  x = x / np.sum(x)
  target = float(power_profile_inner(out_t, out_std, out_t, out_std))
  err2 = float(x @ gram @ x - 2 * x @ rhs + target)
  return x, float(np.sqrt(max(err2, 0.0) / target))
