"""Drop-in replacements for diffusers' schedulers, running on genflow's fused update kernel.

``pipe.scheduler = gf.compat.diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)``
swaps one into a diffusers pipeline. Each class has diffusers' name, config fields, ``timesteps``,
``sigmas`` and ``step`` interface and gives diffusers' results (to float32 rounding); the step
coefficients are computed in float64 on the host and each update is one fused kernel pass.
diffusers itself is not needed.
"""
from ._base import Config, Scheduler, SchedulerOutput
from .ddim import DDIMScheduler
from .ddpm import DDPMScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .flow_match import FlowMatchEulerDiscreteScheduler
from .heun import HeunDiscreteScheduler
from .lms import LMSDiscreteScheduler

__all__ = [
    "Config", "Scheduler", "SchedulerOutput",
    "DDIMScheduler", "DDPMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler", "LMSDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
]
from .deis import DEISMultistepScheduler
from .dpm_solver import DPMSolverMultistepScheduler, DPMSolverSinglestepScheduler
from .unipc import UniPCMultistepScheduler

__all__ += ["DPMSolverMultistepScheduler", "DPMSolverSinglestepScheduler", "UniPCMultistepScheduler",
            "DEISMultistepScheduler"]
