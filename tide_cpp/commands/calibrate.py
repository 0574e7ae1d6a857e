"""tide-cli calibrate: measure this machine's costs for the planner (H2D copy of one expert,
host and device expert time against tokens, non-expert time per forward) and write a hardware
profile (JSON). With -m MODEL the costs are fitted to the engine's own timers on runs of that
model; without, a numpy/memcpy proxy at mini's expert shape is measured and labelled as such."""

import sys


def add_parser(sub):
    p = sub.add_parser("calibrate", help="measure a hardware profile for the planner", description=__doc__)
    p.add_argument("-m", "--model", help="GGUF to calibrate with (engine timers); none: proxy")
    p.add_argument("-o", "--output", required=True, help="profile JSON to write")
    p.add_argument("--device", default="auto", choices=["auto", "sim", "cuda", "cpu"],
                   help="device to calibrate (auto: cuda if present, else sim)")
    p.add_argument("-t", "--threads", type=int, help="host threads (default: all)")
    p.add_argument("-p", "--prompt", action="append", help="prompt(s) for the runs")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--block-lengths", default="4,8,32", help="block lengths of the runs (default 4,8,32)")
    p.add_argument("--repeat", type=int, default=3, help="repeats of each run; timers are their median")
    p.add_argument("--hidden", type=int, default=2048, help="proxy: hidden size (mini: 2048)")
    p.add_argument("--ff", type=int, default=512, help="proxy: expert FFN size (mini: 512)")
    return p


def run(args):
    from ..profile_hw import calibrate_engine, calibrate_proxy
    device = args.device
    if device == "auto":
        device = "sim"
        try:
            from .. import _lib
            if _lib.cuda_available()[0]:
                device = "cuda"
        except Exception:
            pass
    if args.model:
        bls = tuple(int(x) for x in args.block_lengths.split(","))
        print(f"calibrating on {args.model}, device {device}", file=sys.stderr)
        prof = calibrate_engine(args.model, device=device, n_threads=args.threads,
                                prompts=args.prompt, max_tokens=args.max_tokens, block_lengths=bls, repeat=args.repeat,
                                log=lambda s: print(s, file=sys.stderr))
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
