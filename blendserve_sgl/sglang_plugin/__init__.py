"""The SGLang plugin: `--schedule-policy blend` in the stock SGLang 0.5.23 engine.

Registered through the `sglang.srt.plugins` entry point (see pyproject.toml); SGLang calls
`register()` in every process before it parses arguments or builds a scheduler. The hooks:

- `ServerArgs.add_cli_args` (after): `blend` joins the `--schedule-policy` choices and the
  `--blend-*` flags are added (they set the `BLENDSERVE_*` variables the scheduler reads);
- `Scheduler.init_schedule_policy` (around): with `blend`, build the stock FCFS policy, then
  a `BlendPolicy` that wraps it and sees the scheduler;
- `Scheduler._get_new_batch_prefill_raw` (around): `BlendPolicy.after_step` puts the waiting
  requests back after SGLang admitted this step's plan;
- `Scheduler._add_request_to_queue`, `Scheduler._release_aborted_request` (after): arrivals,
  retracted requests and aborts reach the policy's tree;
- `Scheduler.get_internal_state` (after): `blendserve_policy` names the rank's policy class, so
  a caller can check that every DP rank runs `BlendPolicy`.

With any other policy the hooks step aside. If this SGLang is not the version the hooks were
written for, or a hooked method is missing, choosing `blend` fails at once with a message
that names the version needed; there is no silent fallback to another policy.
"""

from __future__ import annotations

import argparse
import logging
import os

logger = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
POLICY_NAME = "blend"
_TARGETS = {
    "add_cli_args": "sglang.srt.server_args.ServerArgs.add_cli_args",
    "init_policy": "sglang.srt.managers.scheduler.Scheduler.init_schedule_policy",
    "prefill": "sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw",
    "enqueue": "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue",
    "abort": "sglang.srt.managers.scheduler.Scheduler._release_aborted_request",
    "state": "sglang.srt.managers.scheduler.Scheduler.get_internal_state",
}
_registered = False


class IncompatibleSGLang(RuntimeError):
    pass


def compatibility_problems() -> list[str]:
    """What stops the hooks from applying to the installed SGLang (empty when all is well)."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    problems = []
    try:
        found = version("sglang")
    except PackageNotFoundError:
        return ["sglang is not installed"]
    if found != SGLANG_VERSION:
        problems.append(f"sglang {found} is installed")
    for target in _TARGETS.values():
        module, cls, attr = target.rsplit(".", 2)
        try:
            owner = getattr(importlib.import_module(module), cls)
        except (ImportError, AttributeError) as exc:
            problems.append(f"{module}.{cls} cannot be imported ({exc})")
            continue
        if not hasattr(owner, attr):
            problems.append(f"{target} does not exist")
    return problems


def require_compatible() -> None:
    problems = compatibility_problems()
    if problems:
        raise IncompatibleSGLang(
            f"--schedule-policy {POLICY_NAME} needs sglang=={SGLANG_VERSION} (blendserve-sgl hooks its scheduler): "
            + "; ".join(problems) + f". Install sglang=={SGLANG_VERSION} or choose another policy.")


def _blend_selected(scheduler) -> bool:
    return getattr(scheduler, "schedule_policy", None) == POLICY_NAME


# ---------------------------------------------------------------------- hooks
class _EnvAction(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None):
        from .settings import KNOBS

        os.environ[KNOBS[self.dest.removeprefix("blend_")][0]] = str(values)
        setattr(namespace, self.dest, values)


def _after_add_cli_args(result, parser, *args, **kwargs):
    from .settings import KNOBS

    for action in parser._actions:
        if action.dest == "schedule_policy" and action.choices is not None and POLICY_NAME not in action.choices:
            action.choices = list(action.choices) + [POLICY_NAME]
            action.help = (action.help or "") + f" '{POLICY_NAME}': BlendServe (blendserve-sgl)."
    if not any(a.dest == "blend_hardware" for a in parser._actions):
        group = parser.add_argument_group("BlendServe (--schedule-policy blend)")
        for field, (_var, flag, text) in KNOBS.items():
            group.add_argument(flag, dest=f"blend_{field}", action=_EnvAction, default=argparse.SUPPRESS, help=text)
    return result


def _around_init_schedule_policy(original, self, *args, **kwargs):
    if not _blend_selected(self):
        return original(self, *args, **kwargs)
    require_compatible()
    from .policy import BlendPolicy
    from .settings import BlendSettings

    settings = BlendSettings.from_env()
    self.schedule_policy = "fcfs"
    try:
        result = original(self, *args, **kwargs)
    finally:
        self.schedule_policy = POLICY_NAME
    self.policy = BlendPolicy(self, self.policy, settings)
    return result


def _around_prefill(original, self, *args, **kwargs):
    policy = getattr(self, "policy", None)
    if not _blend_selected(self) or not hasattr(policy, "after_step"):
        return original(self, *args, **kwargs)
    try:
        return original(self, *args, **kwargs)
    finally:
        policy.after_step()


def _after_enqueue(result, self, req, *args, **kwargs):
    policy = getattr(self, "policy", None)
    if _blend_selected(self) and hasattr(policy, "on_arrival") and self.waiting_queue and self.waiting_queue[-1] is req:
        policy.on_arrival(req)
    return result


def _after_abort(result, self, req, *args, **kwargs):
    policy = getattr(self, "policy", None)
    if _blend_selected(self) and hasattr(policy, "on_abort"):
        policy.on_abort(req)
    return result


def _after_get_internal_state(result, self, *args, **kwargs):
    state = getattr(result, "internal_state", None)
    if isinstance(state, dict):
        state["blendserve_policy"] = type(getattr(self, "policy", None)).__name__
    return result


def _before_server_args_post_init(self, *args, **kwargs):
    if getattr(self, "schedule_policy", None) == POLICY_NAME:
        require_compatible()
        from .settings import BlendSettings

        BlendSettings.from_env()  # bad knob values fail here, in the parent, with the variable's name
    return None


def register() -> None:
    """Entry point (`sglang.srt.plugins`): idempotent."""
    global _registered
    if _registered:
        return
    _registered = True
    from kernels.cpu_fallback import install as install_cpu_fallback

    install_cpu_fallback()  # no-op where a real sgl_kernel imports
    from sglang.srt.plugins.hook_registry import HookRegistry, HookType

    HookRegistry.register(_TARGETS["add_cli_args"], _after_add_cli_args, HookType.AFTER)
    HookRegistry.register(_TARGETS["init_policy"], _around_init_schedule_policy, HookType.AROUND)
    HookRegistry.register(_TARGETS["prefill"], _around_prefill, HookType.AROUND)
    HookRegistry.register(_TARGETS["enqueue"], _after_enqueue, HookType.AFTER)
    HookRegistry.register(_TARGETS["abort"], _after_abort, HookType.AFTER)
    HookRegistry.register(_TARGETS["state"], _after_get_internal_state, HookType.AFTER)
    HookRegistry.register("sglang.srt.server_args.ServerArgs.__post_init__", _before_server_args_post_init,
                          HookType.BEFORE)
    from .cascade_backend import register as register_cascade_backend

    register_cascade_backend()  # --attention-backend cascade (idempotent)
