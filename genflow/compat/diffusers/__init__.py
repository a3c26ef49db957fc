"""Drop-in replacements for diffusers' schedulers, running on genflow's fused update kernel.

``pipe.scheduler = gf.compat.diffusers.EulerDiscreteScheduler.from_config(pipe.scheduler.config)``
swaps one into a diffusers pipeline. Each class has diffusers' name, config fields, ``timesteps``,
``sigmas`` and ``step`` interface and gives diffusers' results (to float32 rounding). The step
coefficients come from genflow's native solvers (``genflow.solvers.dpm_solver.dpm_weights`` /
``dpm_multistep_coefficients`` with ``variant="diffusers"``, ``unipc.unipc_coefficients``,
``deis.deis_coefficients``, ``ddim.ddim_noise_split``; one dynamic threshold,
``genflow.solvers.base.dynamic_threshold``), computed in float64 on the host and, where they depend
on the grid alone, packed once per scheduler class, config and sigma grid (``_base.grid_plans``);
each update is one fused kernel pass into a new tensor (the caller's ``sample`` and
``model_output`` are never written). diffusers itself is not needed.
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
from .kdpm2 import KDPM2AncestralDiscreteScheduler, KDPM2DiscreteScheduler

__all__ += ["KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler"]
from .edm import CosineDPMSolverMultistepScheduler, EDMDPMSolverMultistepScheduler, EDMEulerScheduler

__all__ += ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler", "CosineDPMSolverMultistepScheduler"]
from .inverse import DDIMInverseScheduler, DPMSolverMultistepInverseScheduler

__all__ += ["DDIMInverseScheduler", "DPMSolverMultistepInverseScheduler"]
from .flow_heun import FlowMatchHeunDiscreteScheduler

__all__ += ["FlowMatchHeunDiscreteScheduler"]
from .pndm import IPNDMScheduler, PNDMScheduler

__all__ += ["PNDMScheduler", "IPNDMScheduler"]
from .consistency import CMStochasticIterativeScheduler, LCMScheduler, SCMScheduler, TCDScheduler

__all__ += ["LCMScheduler", "TCDScheduler", "CMStochasticIterativeScheduler", "SCMScheduler"]
from .sde import DPMSolverSDEScheduler

__all__ += ["DPMSolverSDEScheduler"]
from .parallel import DDIMParallelScheduler, DDPMParallelScheduler

__all__ += ["DDIMParallelScheduler", "DDPMParallelScheduler"]
from .sa_solver import SASolverScheduler

__all__ += ["SASolverScheduler"]
from .flow_lcm import FlowMatchLCMScheduler

__all__ += ["FlowMatchLCMScheduler"]
from .ddpm_variants import DDPMWuerstchenScheduler, RePaintScheduler, UnCLIPScheduler

__all__ += ["UnCLIPScheduler", "DDPMWuerstchenScheduler", "RePaintScheduler"]
from .sde_ve import ScoreSdeVeScheduler

__all__ += ["ScoreSdeVeScheduler"]
from .cogvideox import CogVideoXDDIMScheduler, CogVideoXDPMScheduler

__all__ += ["CogVideoXDDIMScheduler", "CogVideoXDPMScheduler"]
from .ltx import LTXEulerAncestralRFScheduler

__all__ += ["LTXEulerAncestralRFScheduler"]
from .flow_euler import FlowMapEulerDiscreteScheduler, MiniMaxH3Scheduler

__all__ += ["MiniMaxH3Scheduler", "FlowMapEulerDiscreteScheduler"]
from .rfd4proteina import RFD4ProteinaScheduler

__all__ += ["RFD4ProteinaScheduler"]
from .helios_dmd import HeliosDMDScheduler

__all__ += ["HeliosDMDScheduler"]
from .piflow import PiflowScheduler

__all__ += ["PiflowScheduler"]
