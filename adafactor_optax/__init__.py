"""Adafactor (Shazeer & Stern, ICML 2018) as composable optax transforms."""

from adafactor_optax._alias import adafactor
from adafactor_optax._clipping import clip_by_block_rms
from adafactor_optax._diagnostics import AdafactorDiagnosticsState
from adafactor_optax._diagnostics import get_diagnostics
from adafactor_optax._diagnostics import record_diagnostics
from adafactor_optax._factored import FactoredMoment
from adafactor_optax._factored import ScaleByFactoredRmsState
from adafactor_optax._factoring import FactorSpec
from adafactor_optax._factoring import factored_axes
from adafactor_optax._factoring import factoring_report
from adafactor_optax._factoring import largest_two_axes
from adafactor_optax._factoring import last_two_axes
from adafactor_optax._factored import scale_by_factored_rms
from adafactor_optax._finite import SkipNonFiniteState
from adafactor_optax._finite import skip_non_finite
from adafactor_optax._momentum import EmaMomentumState
from adafactor_optax._momentum import ema_momentum
from adafactor_optax._schedules import bias_corrected_decay
from adafactor_optax._schedules import increasing_decay
from adafactor_optax._schedules import inverse_sqrt_step
from adafactor_optax._step_size import RelativeStepSizeState
from adafactor_optax._step_size import relative_step_size

__version__ = "0.1.0"

__all__ = (
    "AdafactorDiagnosticsState",
    "EmaMomentumState",
    "FactorSpec",
    "FactoredMoment",
    "RelativeStepSizeState",
    "ScaleByFactoredRmsState",
    "SkipNonFiniteState",
    "adafactor",
    "bias_corrected_decay",
    "clip_by_block_rms",
    "ema_momentum",
    "factored_axes",
    "factoring_report",
    "largest_two_axes",
    "last_two_axes",
    "get_diagnostics",
    "increasing_decay",
    "inverse_sqrt_step",
    "record_diagnostics",
    "relative_step_size",
    "scale_by_factored_rms",
    "skip_non_finite",
)
