"""The first links of `adafactor`'s chain, applied leaf by leaf in one pass.

``chain(scale_by_factored_rms, clip_by_block_rms, relative_step_size)`` takes
two block reductions of the preconditioned update U (its RMS for clipping) and
of X (its RMS for the step size), and the chain forms U in full for the first
of them. `fuse_head` computes the same update from the same per-leaf pure
functions, called once per parameter, parameter by parameter:

  nu    = accumulate(G, nu, b2_t, eps1)                  # R_t, C_t (or V_t)
  denom = clipping_denominator(sqrt(mean(|U|^2)), d)     # from G and nu, no U
  out   = precondition(G, nu, scale=step_scale(X, rho_t, eps2) / denom)

so XLA reads G for the statistics, G for RMS(U), X for RMS(X), and G and X for
the final update, without full-size temporaries. The state is the chain's
state, link for link, so the two are interchangeable (the tests check that they
agree).
"""

from collections.abc import Callable
import jax
import optax

from adafactor_optax import _clipping
from adafactor_optax import _factored
from adafactor_optax import _step_size


def fuse_head(
    links: list[optax.GradientTransformation],
    *,
    decay: Callable[[jax.Array], jax.Array],
    eps: jax.typing.ArrayLike,
    clipping_threshold: jax.typing.ArrayLike | None,
    step_size: optax.ScalarOrSchedule,
    eps2: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
  """``optax.chain(*links)`` with its head computed by one per-leaf function.

  Args:
    links: the chain's transforms; the first are `scale_by_factored_rms`,
      `clip_by_block_rms` (when `clipping_threshold` is not None) and
      `relative_step_size`, built with the arguments given here. The rest are
      applied after them, by their own `update`.
    decay: the b2_t schedule of `scale_by_factored_rms`.
    eps: its eps1.
    clipping_threshold: d of `clip_by_block_rms`, or None when there is none.
    step_size: rho_t of `relative_step_size`, a constant or schedule.
    eps2: its eps2.

  Returns:
    A transformation with the chain's `init` and state, whose `update` equals
    the chain's up to float round-off.
  """
  chain = optax.chain(*links)
  head = 3 if clipping_threshold is not None else 2
  tail = optax.chain(*links[head:])

  def update_fn(updates, state, params=None, **extra_args):
    if params is None:
      raise ValueError("adafactor needs params: call update(updates, state, params).")
    moments, step_state = state[0], state[head - 1]
    b2 = jax.numpy.asarray(decay(moments.count))
    rho = step_size(step_state.count) if callable(step_size) else step_size

    def leaf(g, nu, p):
      nu = _factored.accumulate(g, nu, b2, eps)
      scale = _step_size.step_scale(p, rho, eps2)
      if clipping_threshold is not None:
        rms = jax.numpy.sqrt(_factored.preconditioned_mean_square(g, nu))
        scale = scale / _clipping.clipping_denominator(rms, clipping_threshold)
      return _factored.precondition(g, nu, scale), nu

    grads, treedef = jax.tree.flatten(updates)
    out = [
        leaf(g, v, p)
        for g, v, p in zip(grads, treedef.flatten_up_to(moments.nu), treedef.flatten_up_to(params))
    ]
    updates = treedef.unflatten([u for u, _ in out])
    nu = treedef.unflatten([v for _, v in out])
    new_head = [
        _factored.ScaleByFactoredRmsState(optax.safe_increment(moments.count), nu),
        *state[1 : head - 1],
        type(step_state)(optax.safe_increment(step_state.count)),
    ]
    updates, tail_state = tail.update(updates, tuple(state[head:]), params, **extra_args)
    return updates, (*new_head, *tail_state)

  return optax.GradientTransformationExtraArgs(chain.init, update_fn)

