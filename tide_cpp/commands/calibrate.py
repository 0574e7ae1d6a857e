"""tide-cli calibrate: measure this machine's costs for the planner (H2D copy of one expert,
host and device expert time against tokens, non-expert time per forward) and write a hardware
profile (JSON). With -m MODEL the costs are fitted to the engine's own timers on runs of that
model; without, a numpy/memcpy proxy at mini's expert shape is measured and labelled as such."""

import sys

from . import _options


def add_parser(sub):
    p = sub.add_parser("calibrate", help="measure a hardware profile for the planner", description=__doc__)
    _options.add_model_options(p, required=False, n_ctx=False,
                               help="GGUF to calibrate with (the engine's timers); none: the proxy")
    _options.add_output_option(p, "the hardware profile to write")
    _options.add_prompt_options(p, chat=False)
    _options.add_generation_options(p, ("max_tokens",), max_tokens=32)
    r = p.add_argument_group("runs")
    r.add_argument("--block-lengths", default="4,8,32", help="block lengths of the runs (default 4,8,32)")
    _options.add_repeat_option(r, 3, "repeats of each run; the timers are their median")
    x = p.add_argument_group("proxy (without -m)")
    x.add_argument("--hidden", type=int, default=2048, help="hidden size (mini: 2048)")
    x.add_argument("--ff", type=int, default=512, help="expert FFN size (mini: 512)")
    return p


def run(args):
    from ..calibration import DEFAULT_PROMPTS, calibrate_engine, calibrate_proxy
    from ..model import resolve_device

    device = resolve_device(args.device)
    if args.model:
        bls = tuple(int(x) for x in args.block_lengths.split(","))
        print(f"calibrating on {args.model}, device {device}", file=sys.stderr)
        prof = calibrate_engine(args.model, device=device, n_threads=args.threads,
                                prompts=_options.prompts_of(args, DEFAULT_PROMPTS[:1]),
                                max_tokens=args.max_tokens, block_lengths=bls,
                                repeat=args.repeat, log=lambda s: print(s, file=sys.stderr))
    else:
        print("no model: measuring the numpy/memcpy proxy (not the engine's kernels)", file=sys.stderr)
        prof = calibrate_proxy(args.hidden, args.ff, device=device)
    prof.save(args.output)
    p = prof
    print(f"wrote {args.output} ({p.method})")
    print(f"  H2D: {p.h2d_bandwidth / 1e9:.2f} GB/s ({p.expert_bytes / p.h2d_bandwidth * 1e3:.3f} ms "
          f"per expert of {p.expert_bytes} B)")
    print(f"  host expert:   {p.host_expert[0] * 1e3:.4f} ms + {p.host_expert[1] * 1e6:.3f} us/token")
    print(f"  device expert: {p.device_expert[0] * 1e3:.4f} ms + {p.device_expert[1] * 1e6:.3f} us/token")
    print(f"  shared expert: {p.shared_expert[0] * 1e3:.4f} ms + {p.shared_expert[1] * 1e6:.3f} us/token")
    print(f"  non-expert per forward: {p.nonexpert_step[0] * 1e3:.3f} ms + "
          f"{p.nonexpert_step[1] * 1e6:.3f} us/token; overlap {p.overlap}")
    return 0
