"""tide-cli plan: the best refresh interval and per-layer expert budgets for a grant of device
memory, from a routing trace and a hardware profile; prints the plan beside the paper's uniform
plan and writes a PNG of predicted step time against the interval."""

import os
import sys

from . import _options


def add_parser(sub):
    p = sub.add_parser("plan", help="plan refresh interval and per-layer budgets from a trace and a "
                                    "hardware profile", description=__doc__)
    _options.add_trace_option(p, output=False)
    _options.add_hw_profile_option(p, required=True, help="the costs the plan is priced with")
    _options.add_device_memory_option(p, required=True)
    _options.add_model_option(p, False, "GGUF: read the non-expert weight bytes from it")
    p.add_argument("--nonexpert-bytes", type=_options.size, metavar="SIZE",
                   help="bytes of the non-expert weights (if not in the trace and no -m)")
    p.add_argument("--reserve", type=_options.size, default=0, metavar="SIZE",
                   help="device memory kept for activations and the KV cache, e.g. 512MiB")
    _options.add_taus_option(p, None, "refresh intervals to consider, e.g. 1-16 or 1,2,4,8")
    p.add_argument("--plot", help="PNG path (default: beside the trace, <trace>.plan.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--json", help="also write the plan as JSON here")
    return p


def run(args):
    import json

    from ..model import Model
    from ..planner import HardwareProfile, plan, plot_plan
    from ..replay import Trace
    from ..units import fmt_bytes

    tr = Trace.load(args.trace)
    prof = HardwareProfile.load(args.hw_profile)
    nonexpert = args.nonexpert_bytes
    if nonexpert is None and args.model:
        try:  # the library's own count of the weights that are not routed experts
            with Model(args.model, device="cpu", n_ctx=1) as m:
                nonexpert = int(m.hparams["nonexpert_bytes"])
        except (OSError, RuntimeError) as e:  # RuntimeError: TideError
            print(f"error: {e}", file=sys.stderr)
            return 2
    elif nonexpert is None and tr.nonexpert_bytes is None:
        print("error: the trace does not say the non-expert weight bytes; pass -m MODEL or "
              "--nonexpert-bytes", file=sys.stderr)
        return 2

    def progress(done, total):
        if not sys.stderr.isatty():
            return
        print(f"\rcosting layers: {done}/{total}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    try:
        res = plan(tr, prof, args.device_memory, nonexpert_bytes=nonexpert, taus=args.taus,
                   reserve_bytes=args.reserve, progress=progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trace {args.trace}: {tr.n_forwards} forwards ({tr.n_steps} steps), {tr.n_layers} MoE "
          f"layers x {tr.n_expert} experts of {fmt_bytes(tr.expert_bytes)}")
    print(f"hardware profile {args.hw_profile}: device {prof.device}, H2D "
          f"{prof.h2d_bandwidth / 1e9:.2f} GB/s, host expert {prof.host_expert[0] * 1e3:.3f} ms + {prof.host_expert[1] * 1e6:.2f} us/token, "
          f"overlap {'yes' if prof.overlap else 'no'}"
          + (f" (expert costs scaled from {fmt_bytes(prof.expert_bytes)})"
             if prof.expert_bytes and prof.expert_bytes != tr.expert_bytes else ""))
    print(res.summary())
    print(f"use: --policy tide --refresh-interval {res.refresh_interval} --gpu-experts "
          + ",".join(str(int(b)) for b in res.budgets))
    if not args.no_plot:
        path = args.plot or os.path.splitext(args.trace)[0] + ".plan.png"
        plot_plan(res, path)
        print(f"plot: {path}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"refresh_interval": res.refresh_interval,
                       "budgets": [int(b) for b in res.budgets],
                       "time_per_step": res.time_per_step,
                       "uniform": {"refresh_interval": res.uniform_refresh_interval,
                                   "budget": res.uniform_budget,
                                   "time_per_step": res.uniform_time_per_step},
                       "policies": res.policies, "gpu_memory": res.gpu_memory,
                       "memory_used": res.memory_used, "slots": res.slots}, f, indent=2)
    return 0
