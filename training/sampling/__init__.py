"""Sampling from a denoiser D(x; sigma): the paper's samplers, fast solvers by name, guidance, and images for seeds.

The rooms, from the paper's pieces up:

- ``noise_schedules``: sigma(t) and s(t) (Table 1's "Schedule" and "Scaling");
- ``time_steps``: the noise levels a sampler stops at (Table 1's "Time steps"; Eq. 5 and beyond);
- ``paper``: the probability-flow ODE, Euler/Heun steps, churn, ``edm_sampler`` and ``ablation_sampler``;
- ``solvers``: fast solvers, each a function ``solver(denoise, x, sigmas)``; ``gaussian``: an analytic first step;
- ``search``: time steps optimized for one network;
- ``registry``: ``SAMPLERS``, a solver on time steps within a budget of network calls, by name;
- ``guidance``: guided denoisers (autoguidance, classifier-free guidance);
- ``seeds``: the latents and labels of each seed;
- ``spec``: which sampler runs, one typed value (``PaperSampler``, ``AblationSampler``, ``NamedSampler``);
- ``sample``: ``generate_images`` for seeds;
- ``generation``: sampling to PNG files or to detector features, alone or under torchrun (generate.py, fid.py).

Every sampler takes ``callback(i, sigma, x, denoised)``, called once per step, to watch or record a trajectory.
"""

from training.sampling.guidance import UNCONDITIONAL, GuidedDenoiser, guided
from training.sampling.noise_schedules import (NOISE_SCHEDULES, SCALINGS, NoiseSchedule, Scaling, linear_schedule,
                                               no_scaling, ve_schedule, vp_betas_for_range, vp_scaling, vp_schedule)
from training.sampling.paper import (Churn, ProbabilityFlow, ablation_sampler, edm_sampler, euler_step, heun_step,
                                     solve)
from training.sampling.registry import OPTIMIZED_SCHEDULES, SAMPLERS, Sampler, get_sampler
from training.sampling.sample import generate_images, to_uint8
from training.sampling.spec import (AblationSampler, NamedSampler, PaperSampler, SamplerSpec, sampler_spec,
                                    spec_record)
from training.sampling.seeds import BALANCED, SeedRNG, draw_class_labels, draw_latents
from training.sampling.time_steps import (PAPER_TIME_STEPS, NAMED_TIME_STEPS, TIME_STEPS, default_sigma_range,
                                          discretize, edm_sigma_steps, iddpm_levels, iddpm_sigma_steps,
                                          loguniform_sigma_steps, polyexponential_sigma_steps, sigma_steps,
                                          split_time_steps, ve_sigma_steps, vp_sigma_steps)

__all__ = [
    "UNCONDITIONAL", "GuidedDenoiser", "guided",
    "NOISE_SCHEDULES", "SCALINGS", "NoiseSchedule", "Scaling", "linear_schedule", "no_scaling", "ve_schedule",
    "vp_betas_for_range", "vp_scaling", "vp_schedule",
    "Churn", "ProbabilityFlow", "ablation_sampler", "edm_sampler", "euler_step", "heun_step", "solve",
    "OPTIMIZED_SCHEDULES", "SAMPLERS", "Sampler", "get_sampler",
    "generate_images", "to_uint8",
    "AblationSampler", "NamedSampler", "PaperSampler", "SamplerSpec", "sampler_spec", "spec_record",
    "BALANCED", "SeedRNG", "draw_class_labels", "draw_latents",
    "PAPER_TIME_STEPS", "NAMED_TIME_STEPS", "TIME_STEPS", "default_sigma_range", "discretize", "edm_sigma_steps",
    "iddpm_levels", "iddpm_sigma_steps", "loguniform_sigma_steps", "polyexponential_sigma_steps", "sigma_steps",
    "split_time_steps", "ve_sigma_steps", "vp_sigma_steps",
]
