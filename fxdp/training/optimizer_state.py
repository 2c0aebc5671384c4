"""The DP state of a :class:`fxdp.DPOptimizer`: what a checkpoint must restore for the noise stream
and the configuration the noise is calibrated to (R, loss reduction, expected batch size)."""
from __future__ import annotations

import math


def dp_state(opt) -> dict:
    """The DP part of the state: noise generator states, step count, configuration."""
    return {
        "noise": opt.noise.state_dict(), "steps_taken": opt.steps_taken,
        "noise_multiplier": opt.noise_multiplier, "max_grad_norm": opt.max_grad_norm,
        "expected_batch_size": opt.expected_batch_size, "loss_reduction": opt.loss_reduction.value,
        "hooks": [h.state_dict() if hasattr(h, "state_dict") else None for h in opt.step_hooks],
        "adaptive_clipping": None if opt.adaptive_clipping is None else opt.adaptive_clipping.state_dict(),
    }


def load_dp_state(opt, state: dict) -> None:
    """Restore :func:`dp_state`; refuses a different R, loss reduction or expected batch size.
    Under adaptive clipping the learned R is restored first (into the model's bound)."""
    adaptive = state.get("adaptive_clipping")
    if (adaptive is None) != (opt.adaptive_clipping is None):
        raise ValueError("fxdp: the checkpoint was written " + ("with" if adaptive is not None else "without")
                         + " adaptive clipping and this optimizer " + ("does not" if adaptive is not None else
                         "does") + " use it; resume with the same clipping.")
    if adaptive is not None:
        opt.adaptive_clipping.load_state_dict(adaptive)
    for key in ("max_grad_norm", "expected_batch_size"):
        saved, now = state[key], getattr(opt, key)
        if (saved is None) != (now is None) or (saved is not None and not math.isclose(saved, now)):
            raise ValueError(f"fxdp: the checkpoint has {key}={saved}, this optimizer {now}; resuming would "
                             "change what the noise is calibrated to.")
    if state["loss_reduction"] != opt.loss_reduction.value:
        raise ValueError(f"fxdp: the checkpoint has loss_reduction={state['loss_reduction']!r}, this optimizer "
                         f"{opt.loss_reduction.value!r}.")
    opt.noise.load_state_dict(state["noise"])
    opt.steps_taken = int(state["steps_taken"])
    for hook, hook_state in zip(opt.step_hooks, state.get("hooks", [])):
        if hook_state is not None and hasattr(hook, "load_state_dict"):
            hook.load_state_dict(hook_state)
