"""tide-cli plan: the best refresh interval and per-layer expert budgets for a grant of device
memory, from a routing trace and a hardware profile; prints the plan beside the paper's uniform
plan and writes a PNG of predicted step time against the interval."""

import os
import re
import sys


def add_parser(sub):
    p = sub.add_parser("plan", help="plan refresh interval and per-layer budgets from a trace and a profile",
                       description=__doc__)
    p.add_argument("--trace", required=True, help="routing trace .npz (tide-cli generate --trace)")
    p.add_argument("--profile", required=True, help="hardware profile JSON (tide-cli calibrate)")
    p.add_argument("--gpu-memory", required=True, help="device memory granted, e.g. 8GiB")
    p.add_argument("-m", "--model", help="GGUF: read the non-expert weight bytes from it")
    p.add_argument("--nonexpert-bytes", help="bytes of the non-expert weights (if not in the trace "
                                             "and no -m)")
    p.add_argument("--reserve", default="0", help="device memory kept for activations/KV, e.g. 512MiB")
    p.add_argument("--taus", help="intervals to consider, e.g. 1-16 or 1,2,4,8 (default 1..longest block)")
    p.add_argument("--plot", help="PNG path (default: beside the trace, <trace>.plan.png)")
    p.add_argument("--no-plot", action="store_true", help="do not write the PNG")
    p.add_argument("--json", help="also write the plan as JSON here")
    return p


def gguf_nonexpert_bytes(path):
    """Bytes of every tensor of a GGUF that is not a routed expert (blk.N.ffn_*.E.weight)."""
    from gguf import GGUFReader
    rx = re.compile(r"blk\.\d+\.ffn_(gate|up|down)\.\d+\.weight$")
    return sum(int(t.n_bytes) for t in GGUFReader(path).tensors if not rx.match(t.name))


def parse_taus(s):
    out = set()
    for part in s.split(","):
        if "-" in part:
            a, b = part.split("-")
            out.update(range(int(a), int(b) + 1))
        elif part.strip():
            out.add(int(part))
    return sorted(out)


def run(args):
    import json

    from ..planner import HardwareProfile, fmt_bytes, parse_bytes, plan, plot_plan
    from ..replay import Trace

    tr = Trace.load(args.trace)
    prof = HardwareProfile.load(args.profile)
    nonexpert = None
    if args.nonexpert_bytes:
        nonexpert = parse_bytes(args.nonexpert_bytes)
    elif args.model:
        nonexpert = gguf_nonexpert_bytes(args.model)
    elif tr.nonexpert_bytes is None:
        print("error: the trace does not say the non-expert weight bytes; pass -m MODEL or "
              "--nonexpert-bytes", file=sys.stderr)
        return 2
    taus = parse_taus(args.taus) if args.taus else None

    def progress(done, total):
        if not sys.stderr.isatty():
            return
        print(f"\rcosting layers: {done}/{total}", end="" if done < total else "\n",
              file=sys.stderr, flush=True)

    try:
        res = plan(tr, prof, args.gpu_memory, nonexpert_bytes=nonexpert, taus=taus,
                   reserve_bytes=parse_bytes(args.reserve), progress=progress)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"trace {args.trace}: {tr.n_forwards} forwards ({tr.n_steps} steps), {tr.n_layers} MoE "
          f"layers x {tr.n_expert} experts of {fmt_bytes(tr.expert_bytes)}")
    print(f"profile {args.profile}: device {prof.device}, H2D {prof.h2d_bandwidth / 1e9:.2f} GB/s, "
          f"host expert {prof.host_expert[0] * 1e3:.3f} ms + {prof.host_expert[1] * 1e6:.2f} us/token, "
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
