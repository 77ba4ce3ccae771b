"""Scheduler names accepted in manifests, and how each maps onto a diffusers scheduler."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class SchedulerSpec:
    class_name: str  # diffusers class
    options: tuple[tuple[str, object], ...]  # extra from_config kwargs
    label: str  # AUTOMATIC1111 "Sampler:" name, read by existing tools


SCHEDULERS: dict[str, SchedulerSpec] = {
    "dpmpp_2m_karras": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        (("use_karras_sigmas", True), ("algorithm_type", "dpmsolver++"), ("solver_order", 2)),
        "DPM++ 2M Karras",
    ),
    "dpmpp_2m": SchedulerSpec(
        "DPMSolverMultistepScheduler",
        (("use_karras_sigmas", False), ("algorithm_type", "dpmsolver++"), ("solver_order", 2)),
        "DPM++ 2M",
    ),
    "euler": SchedulerSpec("EulerDiscreteScheduler", (), "Euler"),
    "euler_a": SchedulerSpec("EulerAncestralDiscreteScheduler", (), "Euler a"),
    "ddim": SchedulerSpec("DDIMScheduler", (), "DDIM"),
    "pndm": SchedulerSpec("PNDMScheduler", (("skip_prk_steps", True),), "PLMS"),
    "lms": SchedulerSpec("LMSDiscreteScheduler", (), "LMS"),
    "unipc": SchedulerSpec("UniPCMultistepScheduler", (), "UniPC"),
    # Flow matching (SD3, Flux): Euler over the model's own shifted sigmas, as their pipelines ship it.
    "flow_euler": SchedulerSpec("FlowMatchEulerDiscreteScheduler", (), "Euler"),
    "flow_euler_karras": SchedulerSpec("FlowMatchEulerDiscreteScheduler", (("use_karras_sigmas", True),), "Euler Karras"),
    # The scheduler the model ships (the only one a family sdbatch does not describe in detail may use).
    "default": SchedulerSpec("", (), "Default"),
}


def build_scheduler(name: str, base_config):
    """A fresh scheduler of the named kind over the model's own noise schedule."""
    import diffusers

    spec = SCHEDULERS[name]
    if not spec.class_name:  # "default": the model's own class and config
        return getattr(diffusers, base_config["_class_name"]).from_config(base_config)
    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(base_config, **dict(spec.options))
