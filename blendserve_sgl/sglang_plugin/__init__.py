"""The SGLang plugin: `--schedule-policy blend` in the stock SGLang 0.5.23 engine.

Registered through the `sglang.srt.plugins` entry point (see pyproject.toml); SGLang calls
`register()` in every process before it parses arguments or builds a scheduler. The hooks:

- `ServerArgs.add_cli_args` (after): `blend` joins the `--schedule-policy` choices and the
  `--blend-*` flags are added (typed and checked by argparse: a bad value stops the launch
  naming the flag);
- `ServerArgs.from_cli_args` (after) and `ServerArgs.check_server_args` (after; the launching
  process runs it for `launch_server` and `sglang.Engine` before any subprocess starts or model
  loads): the settings (`BLENDSERVE_*` variables, then the `--blend-*` flags) and, with
  `--attention-backend cascade`, the `BLENDSERVE_CASCADE_*` variables are checked there and ride
  to the scheduler on the ServerArgs (`settings.SETTINGS_ATTR`). A bad value is one line and
  exit 2 on the command line, a ValueError naming the variable from `sglang.Engine`. (ServerArgs
  is a msgspec Struct, which calls the `__post_init__` it was built with, so a hook there never
  runs.);
- `Scheduler.init_schedule_policy` (around): with `blend`, build the stock FCFS policy, then
  a `BlendPolicy` that wraps it and sees the scheduler;
- `Scheduler._get_new_batch_prefill_raw` (around): `BlendPolicy.after_step` puts the waiting
  requests back after SGLang admitted this step's plan;
- `Scheduler._add_request_to_queue`, `Scheduler._release_aborted_request` (after): arrivals,
  retracted requests and aborts reach the policy's tree; a new request whose prompt the forward
  pass cannot take (no tokens, ids outside the vocabulary) ends as its own 400 error first;
- `Scheduler.get_internal_state` (after): `blendserve_policy` names the rank's policy class, so
  a caller can check that every DP rank runs `BlendPolicy`;
- `Engine.server_args_class` (set, not hooked: `_engine_keywords`): `sglang.Engine` takes the
  settings as `blend_*` keyword arguments.

With any other policy the hooks step aside. If this SGLang is not the version the hooks were
written for, or a hooked method is missing, choosing `blend` fails at once with a message
that names the version needed; there is no silent fallback to another policy.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

logger = logging.getLogger(__name__)

SGLANG_VERSION = "0.5.23"
POLICY_NAME = "blend"
_TARGETS = {
    "add_cli_args": "sglang.srt.server_args.ServerArgs.add_cli_args",
    "init_policy": "sglang.srt.managers.scheduler.Scheduler.init_schedule_policy",
    "prefill": "sglang.srt.managers.scheduler.Scheduler._get_new_batch_prefill_raw",
    "enqueue": "sglang.srt.managers.scheduler.Scheduler._add_request_to_queue",
    "abort": "sglang.srt.managers.scheduler.Scheduler._release_aborted_request",
    "check_args": "sglang.srt.server_args.ServerArgs.check_server_args",
    "from_cli_args": "sglang.srt.server_args.ServerArgs.from_cli_args",
    "state": "sglang.srt.managers.scheduler.Scheduler.get_internal_state",
}
# Every SGLang name the plugin relies on beyond the hooked methods above: class and module
# attributes (checked at start by compatibility_problems()) and the attributes of the live
# scheduler that BlendPolicy reads or sets (checked once the scheduler is built).
SGLANG_NAMES = (
    "sglang.srt.managers.scheduler.Scheduler.get_num_allocatable_reqs",
    "sglang.srt.managers.schedule_policy.SchedulePolicy.calc_priority",
    "sglang.srt.managers.schedule_policy.SchedulePolicy.waiting_queue_prefix_matched",
    "sglang.srt.managers.schedule_policy.SchedulePolicy.shortest_prefill_chunk_limit",
    "sglang.srt.managers.schedule_policy.CLIP_MAX_NEW_TOKENS",
    "sglang.srt.managers.schedule_batch.Req.finished",
    "sglang.srt.managers.schedule_batch.Req.set_finish_with_abort",
    "sglang.srt.managers.schedule_batch.FINISH_ABORT",  # by name: `policy.ending_by_abort`
    "sglang.srt.server_args.ServerArgs.schedule_policy",
    "sglang.srt.runtime_context.get_parallel",
    "sglang.srt.entrypoints.engine.Engine.server_args_class",  # `blend_*` keywords (`_engine_keywords`)
)
SCHEDULER_ATTRS = (
    "waiting_queue", "policy", "schedule_policy", "server_args", "model_config", "new_token_ratio_tracker",
    "token_to_kv_pool_allocator", "tree_cache", "chunked_prefill_size", "max_prefill_tokens", "is_mixed_chunk",
    "chunked_req", "forward_ct", "max_total_num_tokens", "page_size", "disable_radix_cache",
)  # and, set after the policy is built, "truncation_align_size" (read with a default of None)
_registered = False


class IncompatibleSGLang(RuntimeError):
    pass


def compatibility_problems(scheduler=None) -> list[str]:
    """What stops the plugin from working with the installed SGLang (empty when all is well):
    its version, the hooked methods, `SGLANG_NAMES` and, given the live scheduler, `SCHEDULER_ATTRS`."""
    import importlib
    from importlib.metadata import PackageNotFoundError, version

    problems = []
    try:
        found = version("sglang")
    except PackageNotFoundError:
        return ["sglang is not installed"]
    if found != SGLANG_VERSION:
        problems.append(f"sglang {found} is installed")
    for target in (*_TARGETS.values(), *SGLANG_NAMES):
        module, rest = target, []
        while True:  # the longest importable module prefix, then attributes
            try:
                owner = importlib.import_module(module)
                break
            except ImportError:
                if "." not in module:
                    owner = None
                    break
                module, last = module.rsplit(".", 1)
                rest.insert(0, last)
        if owner is None:
            problems.append(f"{target} cannot be imported")
            continue
        for i, attr in enumerate(rest):
            fields = getattr(owner, "__dataclass_fields__", {})
            if i == len(rest) - 1 and attr in fields:
                break
            if not hasattr(owner, attr):
                problems.append(f"{target} does not exist")
                break
            owner = getattr(owner, attr)
    if scheduler is not None:
        problems += [f"Scheduler has no attribute {a!r}" for a in SCHEDULER_ATTRS if not hasattr(scheduler, a)]
    return problems


def require_compatible(scheduler=None) -> None:
    problems = compatibility_problems(scheduler)
    if problems:
        raise IncompatibleSGLang(
            f"--schedule-policy {POLICY_NAME} needs sglang=={SGLANG_VERSION} (blendserve-sgl hooks its scheduler): "
            + "; ".join(problems) + f". Install sglang=={SGLANG_VERSION} or choose another policy.")


def _blend_selected(scheduler) -> bool:
    return getattr(scheduler, "schedule_policy", None) == POLICY_NAME


# ---------------------------------------------------------------------- hooks
def _flag_parser(knob):
    def parse(raw: str):
        try:
            return knob.parse(raw, knob.flag)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{knob.flag}=")) from None  # argparse names the flag
    parse.__name__ = knob.kind.__name__
    return parse


def _after_add_cli_args(result, parser, *args, **kwargs):
    from .settings import KNOBS

    for action in parser._actions:
        if action.dest == "schedule_policy" and action.choices is not None and POLICY_NAME not in action.choices:
            action.choices = list(action.choices) + [POLICY_NAME]
            action.help = (action.help or "") + f" '{POLICY_NAME}': BlendServe (blendserve-sgl)."
    if not any(a.dest == "blend_hardware" for a in parser._actions):
        group = parser.add_argument_group("BlendServe (--schedule-policy blend)")
        for knob in KNOBS.values():
            group.add_argument(knob.flag, dest=f"blend_{knob.name}", type=_flag_parser(knob), default=argparse.SUPPRESS,
                               help=f"{knob.help} Default: {knob.default_value!r} (or ${knob.var}).")
    return result


def _after_from_cli_args(result, *args, **kwargs):
    """The parsed `--blend-*` values (already checked by argparse) over the variables, carried to
    the scheduler on the ServerArgs. A bad variable ends the command line like a bad flag: one
    line naming it, exit 2."""
    from .settings import KNOBS, SETTINGS_ATTR, BlendSettings

    namespace = args[-1] if args else kwargs.get("args")
    flags = {k.name: getattr(namespace, f"blend_{k.name}") for k in KNOBS.values()
             if hasattr(namespace, f"blend_{k.name}")}
    policy = getattr(result, "schedule_policy", None)
    try:
        if policy == POLICY_NAME or flags:
            setattr(result, SETTINGS_ATTR, BlendSettings.load(os.environ, flags))
        if policy == POLICY_NAME and getattr(result, "enable_priority_scheduling", False):
            raise ValueError(f"--schedule-policy {POLICY_NAME} orders the queue itself and takes no request "
                             "priorities: drop --enable-priority-scheduling, or use --schedule-policy fcfs or lof "
                             "for it")
        if flags and policy != POLICY_NAME:
            print(f"warning: {', '.join('--blend-' + k.replace('_', '-') for k in sorted(flags))} take effect only "
                  f"with --schedule-policy {POLICY_NAME}; this server runs {policy}", file=sys.stderr)
        _check_launch(result)
    except (ValueError, IncompatibleSGLang) as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    return result


def _after_check_server_args(result, self, *args, **kwargs):
    _check_launch(self)
    return result


def _check_launch(server_args) -> None:
    """In the launching process, before any model loads: with `blend` the SGLang version and the
    `BLENDSERVE_*` variables (kept on the ServerArgs for the scheduler unless the command line
    already put them there with its flags), with the cascade backend its variables."""
    from .settings import SETTINGS_ATTR, BlendSettings, check_launch

    policy = getattr(server_args, "schedule_policy", None)
    backends = [getattr(server_args, a, None) for a in ("attention_backend", "prefill_attention_backend",
                                                          "decode_attention_backend")]
    if policy == POLICY_NAME:
        require_compatible()
        if getattr(server_args, SETTINGS_ATTR, None) is None:
            setattr(server_args, SETTINGS_ATTR, BlendSettings.load(os.environ))
        config = os.path.join(str(getattr(server_args, "model_path", "") or ""), "config.json")
        if os.path.isfile(config):  # a local model: the cost model reads its config (a hub id is read later)
            from ..core.specs import ModelSpec

            ModelSpec.from_config_file(config)
    check_launch(None, backends)  # the cascade backend's variables (blend's were read above)


def _around_init_schedule_policy(original, self, *args, **kwargs):
    if not _blend_selected(self):
        return original(self, *args, **kwargs)
    require_compatible()
    from .policy import BlendPolicy
    from .settings import SETTINGS_ATTR, BlendSettings

    settings = getattr(self.server_args, SETTINGS_ATTR, None) or BlendSettings.load(os.environ)
    self.schedule_policy = "fcfs"
    try:
        result = original(self, *args, **kwargs)
    finally:
        self.schedule_policy = POLICY_NAME
    require_compatible(self)
    self.policy = BlendPolicy(self, self.policy, settings)
    return result


def _around_prefill(original, self, *args, **kwargs):
    policy = getattr(self, "policy", None)
    if not _blend_selected(self) or not hasattr(policy, "end_step"):
        return original(self, *args, **kwargs)
    running_batch = kwargs["running_batch"] if "running_batch" in kwargs else args[-1] if args else None
    policy.begin_step(running_batch)
    result = None
    try:
        result = original(self, *args, **kwargs)
        return result
    finally:
        policy.end_step(result)


def _after_enqueue(result, self, req, *args, **kwargs):
    policy = getattr(self, "policy", None)
    if _blend_selected(self) and hasattr(policy, "on_arrival") and self.waiting_queue and self.waiting_queue[-1] is req:
        _refuse_unrunnable(self, req)
        policy.on_arrival(req)
    return result


def _refuse_unrunnable(scheduler, req) -> None:
    """A new request that would end the scheduler (`policy.request_problem`: its prompt, logprobs,
    sampling or embeddings) ends as a 400 error of its own, the way SGLang ends a prompt longer than the context (a one-token
    stand-in prompt, finished with the abort), instead of killing the scheduler."""
    from .policy import request_problem

    if req.finished() or getattr(req, "to_finish", None) is not None or req.output_ids:
        return  # already ending, or retracted with its output so far
    config = getattr(scheduler, "model_config", None)
    problem = request_problem(req, getattr(config, "vocab_size", None), getattr(config, "hidden_size", None))
    if problem:
        req.set_finish_with_abort(problem)
        # its one-token stand-in still passes a prefill step: nothing of what was refused may reach
        # the sampler or the penalizers there
        sp = getattr(req, "sampling_params", None)
        for name, harmless in (("repetition_penalty", 1.0), ("min_new_tokens", 0), ("stop_token_ids", None),
                               ("top_k", 1)):
            if hasattr(sp, name):
                setattr(sp, name, harmless)
        if getattr(req, "input_embeds", None) is not None:
            req.input_embeds = None  # the stand-in prompt is its token


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
    HookRegistry.register(_TARGETS["check_args"], _after_check_server_args, HookType.AFTER)
    HookRegistry.register(_TARGETS["from_cli_args"], _after_from_cli_args, HookType.AFTER)
    HookRegistry.register(_TARGETS["state"], _after_get_internal_state, HookType.AFTER)
    from .cascade_backend import register as register_cascade_backend

    register_cascade_backend()  # --attention-backend cascade (idempotent)
    _engine_keywords()


def _engine_keywords() -> None:
    """`sglang.Engine(..., blend_keep_sharing=0.9)`: the `--blend-*` settings as keyword
    arguments, as SGLang's Engine takes every other server argument. The Engine builds its
    ServerArgs through `Engine.server_args_class` after it has loaded the plugins, so that
    attribute becomes a builder that takes the `blend_*` keywords off (checked:
    `settings.keyword_settings`) and puts the settings, over the variables, on the ServerArgs as
    the command line's flags do. Set directly: a hook-registry REPLACE of a class would rebind
    every module's `ServerArgs` to the builder. Only where the Engine's module is loaded (a process
    that builds an Engine loads the plugins from `Engine.__init__`); SGLang's subprocesses build no
    Engine and are spared the import."""
    module = sys.modules.get("sglang.srt.entrypoints.engine")
    Engine = getattr(module, "Engine", None)
    if Engine is None:
        return
    base = Engine.__dict__.get("server_args_class")
    if base is None or getattr(base, "__func__", None) is not None:
        return  # already ours (or a subclass's own): nothing to wrap

    def build(**kwargs):
        keys = [k for k in kwargs if k.startswith("blend_")]
        if not keys:
            return base(**kwargs)
        from .settings import SETTINGS_ATTR, BlendSettings, keyword_settings

        flags = keyword_settings({k: kwargs.pop(k) for k in keys})
        server_args = base(**kwargs)
        policy = getattr(server_args, "schedule_policy", None)
        if policy != POLICY_NAME:
            logger.warning("%s take effect only with schedule_policy=%r; this engine runs %s", ", ".join(keys),
                           POLICY_NAME, policy)
        setattr(server_args, SETTINGS_ATTR, BlendSettings.load(os.environ, flags))
        return server_args

    build.__wrapped__ = base
    Engine.server_args_class = staticmethod(build)
