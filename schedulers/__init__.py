"""Schedule maths: approximated x0, velocity and their inverse for unmodified diffusers schedulers."""
from .x0 import (PREDICTION_TYPES, SUPPORTED_SCHEDULERS, approx_x0, check_scheduler, coefficients,
                 model_output_for_x0, model_output_shift, velocity)

__all__ = ["PREDICTION_TYPES", "SUPPORTED_SCHEDULERS", "approx_x0", "check_scheduler", "coefficients",
           "model_output_for_x0", "model_output_shift", "velocity"]
