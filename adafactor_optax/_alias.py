"""`adafactor`: the paper's algorithm as a chain of this package's transforms."""

from typing import Any

import jax
import optax

from adafactor_optax import (
  _clipping,
  _diagnostics,
  _factored,
  _factoring,
  _finite,
  _flax,
  _leafwise,
  _momentum,
  _numerics,
  _rounding,
  _schedules,
  _step_size,
)


def _check_hyperparameters(learning_rate, multiply_by_parameter_scale, weight_decay_rate,
                           momentum, clipping_threshold, max_relative_step) -> None:
  """`adafactor`'s own checks (the links check the rest): a ValueError naming the argument."""
  if learning_rate is None and not multiply_by_parameter_scale:
    raise ValueError(
        "learning_rate=None (the relative step) needs multiply_by_parameter_scale"
        "=True; give an absolute learning_rate to turn the parameter scale off."
    )
  if learning_rate is not None and not callable(learning_rate):
    _numerics.check("learning_rate", learning_rate, lambda s: s >= 0, ">= 0")
  if weight_decay_rate is not None and not callable(weight_decay_rate):
    _numerics.check("weight_decay_rate", weight_decay_rate, lambda w: w >= 0, ">= 0")
  if momentum is not None:
    _numerics.check("momentum", momentum, lambda b: 0 <= b < 1, "in [0, 1)")
  if clipping_threshold is not None:
    _numerics.check("clipping_threshold", clipping_threshold, lambda d: d > 0, "> 0")
  if learning_rate is None:
    _numerics.check("max_relative_step", max_relative_step, lambda s: s > 0, "> 0")


def adafactor(
    learning_rate: optax.ScalarOrSchedule | None = None,
    min_dim_size_to_factor: int | None = None,
    decay_rate: jax.typing.ArrayLike = 0.8,
    decay_offset: jax.typing.ArrayLike = 0,
    multiply_by_parameter_scale: bool = True,
    clipping_threshold: jax.typing.ArrayLike | None = 1.0,
    momentum: jax.typing.ArrayLike | None = None,
    dtype_momentum: Any = None,
    weight_decay_rate: optax.ScalarOrSchedule | None = None,
    eps: jax.typing.ArrayLike = 1e-30,
    factored: bool = True,
    weight_decay_mask: Any = None,
    *,
    eps2: jax.typing.ArrayLike = 1e-3,
    max_relative_step: jax.typing.ArrayLike = 1e-2,
    decay_schedule: Any = None,
    stats_dtype: Any = None,
    factor_rule: Any = None,
    skip_non_finite: bool = False,
    diagnostics: bool = False,
    stochastic_rounding: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Adafactor (Shazeer & Stern, 2018), exactly the paper's algorithm by default.

  With no arguments this is the paper's Algorithm 4 (matrices) and 5 (the
  rest) with Algorithm 6's hyperparameters (arXiv:1804.04235)::

    alpha_t = max(eps2, RMS(X_{t-1})) * min(1e-2, 1/sqrt(t))   # relative step
    b2_t    = 1 - t^-0.8
    U_t     = G_t / sqrt(V_t)           # V_t factored: R_t C_t / mean(R_t)
    Uc_t    = U_t / max(1, RMS(U_t)/d)  # d = 1
    X_t     = X_{t-1} - alpha_t Uc_t

  built as ``optax.chain(scale_by_factored_rms, relative_step_size,
  [ema_momentum], [add_decayed_weights], scale(-1))``, with the clipping done
  inside `scale_by_factored_rms` (``clipping_threshold=d``): equal to a
  separate `clip_by_block_rms` link after it, in two fewer passes over
  parameter-sized memory. Compiled for TPU, a tree of 64 leaves or more is
  stepped leaf by leaf, each leaf after the new parameter of the leaf two
  before it, so that XLA:TPU cannot schedule the step breadth-first (the same
  arithmetic; not with diagnostics, a weight decay mask, int8 momentum or
  skip_non_finite).

  It takes `optax.adafactor`'s arguments with the same meanings, in the same
  positional order (the arguments after them are keyword-only), and with an
  explicit `learning_rate` its updates equal `optax.adafactor`'s. The one
  intended difference: ``learning_rate=None`` means the paper's relative step
  rho_t = min(max_relative_step, 1/sqrt(t)), where `optax.adafactor` applies no
  step size at all (every update then has the parameter's RMS).

  Args:
    learning_rate: rho_t, a constant or optax schedule. With
      `multiply_by_parameter_scale` it is a relative step (scaled by the
      parameter's RMS); without, an absolute one. None: the paper's rho_t.
    min_dim_size_to_factor: factor the two largest axes of a parameter when
      both have at least this many elements. None: 128, as optax.
    decay_rate: c in ``b2_t = 1 - t^-c`` (> 0).
    decay_offset: the count at which the decay schedule restarts (fine-tuning).
    multiply_by_parameter_scale: scale the step by ``max(eps2, RMS(X))``.
    clipping_threshold: d of the update clipping; None turns clipping off.
    momentum: b1 of an exponential average of the step; None for none (the
      paper's default, which keeps the memory sublinear).
    dtype_momentum: dtype the momentum is stored in. None: float32, or float64
      for float64 parameters (optax: always float32). ``"int8"``: int8 with
      per-block float32 scales (`ema_momentum`), 1.03 bytes per parameter.
    weight_decay_rate: decoupled weight decay, added after the step size (not
      multiplied by it), as in optax.
    eps: eps1, added to G^2 before the moving averages.
    factored: False keeps every second moment whole (Table 2 rows A, B, ...).
    weight_decay_mask: which parameters get weight decay (optax's mask).
    eps2: the floor of the parameter scale.
    max_relative_step: the cap of the default rho_t (used when
      `learning_rate` is None).
    decay_schedule: a schedule ``count -> b2_t`` replacing `decay_rate` and
      `decay_offset`, e.g. ``bias_corrected_decay(0.999)``.
    stats_dtype: dtype of the second-moment statistics (default float32, or
      float64 for float64 parameters).
    factor_rule: which axes each parameter factors: None or "largest" (the
      two largest axes, as optax), "last_two" (tensor2tensor, PyTorch, HF), a
      callable ``(path, shape) -> FactorSpec | None | DEFAULT_FACTORING`` or a
      pytree of those. None keeps the second moment whole; `DEFAULT_FACTORING`
      means what the default rule gives the parameter, e.g. outside the stacks
      of ``stacked_layers()``. A spec's batch axes also split clipping and the
      parameter scale into per-slice blocks (a scanned stack of layers), and
      its `estimate` chooses row-only or column-only statistics.
    skip_non_finite: skip every step whose gradients hold a NaN or Inf
      (parameters and state unchanged) and count them (`skip_non_finite`).
    diagnostics: record RMS(U_t), the clipped fraction, b2_t, rho_t and
      alpha_t in the state (`record_diagnostics`; read them with
      ``get_diagnostics(state)``), per block of a rule's batch axes. Off: no
      cost at all.
    stochastic_rounding: end the chain with `stochastic_rounding`, so that
      `optax.apply_updates` rounds bfloat16 and float16 parameters
      stochastically (unbiased) instead of to nearest; float32 parameters are
      unaffected.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: for a hyperparameter out of its range, or ``learning_rate=None``
      together with ``multiply_by_parameter_scale=False`` (no step size).

  Example:
    >>> import jax, jax.numpy as jnp, optax
    >>> import adafactor_optax as ao
    >>> params = {"w": jnp.ones((256, 128)), "b": jnp.zeros((128,))}
    >>> tx = ao.adafactor()
    >>> state = tx.init(params)
    >>> grads = jax.tree.map(jnp.ones_like, params)
    >>> updates, state = tx.update(grads, state, params)
    >>> params = optax.apply_updates(params, updates)
    >>> # w: 1 - rho_1 * RMS(w) * 1;  b: 0 - rho_1 * eps2 * 1
    >>> round(float(params["w"][0, 0]), 6), round(float(params["b"][0]), 9)
    (0.99, -1e-05)

  References:
    Shazeer & Stern, Adafactor: Adaptive Learning Rates with Sublinear Memory
    Cost, ICML 2018. https://arxiv.org/abs/1804.04235
  """
  _check_hyperparameters(learning_rate, multiply_by_parameter_scale, weight_decay_rate,
                         momentum, clipping_threshold, max_relative_step)
  if decay_schedule is None:
    _numerics.check("decay_rate", decay_rate, lambda c: c > 0, "> 0")
    decay_schedule = _schedules.increasing_decay(decay_rate, decay_offset)
  if min_dim_size_to_factor is None:
    min_dim_size_to_factor = _factoring.DEFAULT_MIN_DIM_SIZE_TO_FACTOR
  # A user's rule is resolved once, here, and asked once per parameter by all
  # the links; the named rules stay names (min_dim_size_to_factor may be traced).
  if factored and factor_rule is not None and not isinstance(factor_rule, str):
    factor_rule = _factoring.resolve(factor_rule)
  # Clipping inside scale_by_factored_rms is the same step in fewer memory
  # passes; the diagnostics read U_t before clipping, so they keep it apart.
  clip_apart = diagnostics and clipping_threshold is not None
  tx = [
      _factored.scale_by_factored_rms(
          decay=decay_schedule,
          eps=eps,
          factored=factored,
          min_dim_size_to_factor=min_dim_size_to_factor,
          factor_rule=factor_rule,
          stats_dtype=stats_dtype,
          clipping_threshold=None if clip_apart else clipping_threshold,
      )
  ]
  if clip_apart and clipping_threshold is not None:  # the second test is for mypy
    tx.append(_clipping.clip_by_block_rms(
        clipping_threshold, factor_rule=factor_rule if factored else None))
  if multiply_by_parameter_scale and learning_rate is None:
    learning_rate = _schedules.inverse_sqrt_step(max_relative_step)
  tx.append(_step_size.relative_step_size(
      learning_rate, eps2=eps2, factor_rule=factor_rule if factored else None)
            if multiply_by_parameter_scale
            else optax.scale_by_learning_rate(learning_rate, flip_sign=False))
  if momentum is not None:
    tx.append(_momentum.ema_momentum(momentum, accumulator_dtype=dtype_momentum))
  if weight_decay_rate is not None:
    tx.append(optax.add_decayed_weights(weight_decay_rate, mask=weight_decay_mask))
  tx.append(optax.scale(-1.0))
  if stochastic_rounding:
    tx.append(_rounding.stochastic_rounding())
  if diagnostics:  # right after scale_by_factored_rms, where the updates are U_t
    tx.insert(1, _diagnostics.record_diagnostics(
        decay=decay_schedule,
        step_size=learning_rate,
        eps2=eps2 if multiply_by_parameter_scale else None,
        clipping_threshold=clipping_threshold,
        factor_rule=factor_rule if factored else None,
    ))
  chain = optax.chain(*tx)
  # Traced leaf by leaf where the plan reduces each leaf alone, and tied in leaf
  # order on TPU (`_leafwise`). The diagnostics (sums over the tree) and a weight
  # decay mask (a tree of its own) are not per leaf. Untied, these step estimates
  # are lower (195 leaves, lr 1e-2): int8 momentum 1,098 against 1,151 us tied on
  # v5p, 2,556 against 2,632 on v5e; skip_non_finite 1,526 against 1,581 (v5p), as
  # its selected updates are not the `p + u` that the tie computes.
  int8 = momentum is not None and _momentum.is_int8(dtype_momentum)
  if not (diagnostics or weight_decay_mask is not None):
    # What the links read of a leaf's path: its batch axes under a user's rule.
    rule = factor_rule if factored and callable(factor_rule) else None
    chain = _leafwise.leaf_by_leaf(
        chain, lambda path, shape: _factoring.batch_axes(rule, path, shape),
        tie=not (int8 or skip_non_finite))
  if int8:  # it reads each update twice (its block max, its values): see `_numerics.narrow`
    chain = _narrowed_by_bits(chain)
  # Boxed (Flax) parameters: a state whose metadata fits each of its own arrays.
  return _flax.with_flax_metadata(_finite.skip_non_finite(chain) if skip_non_finite else chain)


def _narrowed_by_bits(inner: optax.GradientTransformation) -> optax.GradientTransformationExtraArgs:
  """`inner` traced inside `_numerics.narrowing_by_bits`: its links round their float32
  updates to bfloat16 on the bits on CPU, which XLA:CPU recomputes where they are read twice."""
  inner = optax.with_extra_args_support(inner)

  def update_fn(updates, state, params=None, **extra_args):
    with _numerics.narrowing_by_bits():
      return inner.update(updates, state, params, **extra_args)

  return optax.GradientTransformationExtraArgs(inner.init, update_fn)
