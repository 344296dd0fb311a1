"""Adafactor (Shazeer & Stern, ICML 2018) as composable optax transforms."""

from adafactor_optax._alias import adafactor
from adafactor_optax._clipping import clip_by_block_rms
from adafactor_optax._diagnostics import (
    AdafactorDiagnosticsState,
    get_diagnostics,
    record_diagnostics,
)
from adafactor_optax._factored import FactoredMoment, ScaleByFactoredRmsState, scale_by_factored_rms
from adafactor_optax._factoring import (
    DEFAULT_FACTORING,
    FactorSpec,
    factored_axes,
    factoring_report,
    largest_two_axes,
    last_two_axes,
    stacked_layers,
)
from adafactor_optax._flax import with_flax_metadata
from adafactor_optax._finite import SkipNonFiniteState, skip_non_finite
from adafactor_optax._momentum import EmaMomentumState, ema_momentum
from adafactor_optax._quantize import BlockQuantized
from adafactor_optax._rounding import StochasticRoundingState, stochastic_rounding
from adafactor_optax._schedules import bias_corrected_decay, increasing_decay, inverse_sqrt_step
from adafactor_optax._sharding import state_partition_specs, state_shardings
from adafactor_optax._step_size import RelativeStepSizeState, relative_step_size

__version__ = "0.2.0"

__all__ = (
    "DEFAULT_FACTORING",
    "AdafactorDiagnosticsState",
    "BlockQuantized",
    "EmaMomentumState",
    "FactorSpec",
    "FactoredMoment",
    "RelativeStepSizeState",
    "ScaleByFactoredRmsState",
    "SkipNonFiniteState",
    "StochasticRoundingState",
    "adafactor",
    "bias_corrected_decay",
    "clip_by_block_rms",
    "ema_momentum",
    "factored_axes",
    "factoring_report",
    "get_diagnostics",
    "increasing_decay",
    "inverse_sqrt_step",
    "largest_two_axes",
    "last_two_axes",
    "record_diagnostics",
    "relative_step_size",
    "scale_by_factored_rms",
    "skip_non_finite",
    "stacked_layers",
    "state_partition_specs",
    "state_shardings",
    "stochastic_rounding",
    "with_flax_metadata",
)
