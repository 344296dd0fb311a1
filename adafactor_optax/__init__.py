"""Adafactor (Shazeer & Stern, ICML 2018) as composable optax transforms."""

from adafactor_optax._alias import adafactor
from adafactor_optax._clipping import clip_by_block_rms
from adafactor_optax._factored import FactoredMoment
from adafactor_optax._factored import ScaleByFactoredRmsState
from adafactor_optax._factored import factored_axes
from adafactor_optax._factored import scale_by_factored_rms
from adafactor_optax._momentum import EmaMomentumState
from adafactor_optax._momentum import ema_momentum
from adafactor_optax._schedules import bias_corrected_decay
from adafactor_optax._schedules import increasing_decay
from adafactor_optax._schedules import inverse_sqrt_step
from adafactor_optax._step_size import RelativeStepSizeState
from adafactor_optax._step_size import relative_step_size
from adafactor_optax._sharding import state_partition_specs
from adafactor_optax._sharding import state_shardings

__version__ = "0.1.0"

__all__ = (
    "EmaMomentumState",
    "FactoredMoment",
    "RelativeStepSizeState",
    "ScaleByFactoredRmsState",
    "adafactor",
    "bias_corrected_decay",
    "clip_by_block_rms",
    "ema_momentum",
    "factored_axes",
    "increasing_decay",
    "inverse_sqrt_step",
    "relative_step_size",
    "scale_by_factored_rms",
    "state_partition_specs",
    "state_shardings",
)
