"""Cross-check native/src/residency.c against tide_cpp/replay.py, the contract's two implementations.

Random synthetic traces (replay.synthetic_trace) go through every policy with random budgets
(0, below, at and above n_expert), intervals and popularity profiles, once in the C core's
decision logic (a small driver compiled here against residency.c) and once in replay(); every
layer's counters, budget and final resident set must agree exactly.

Run: .venv/bin/python native/tests/residency_replay_check.py [n_traces]   (exit 1 on a mismatch)
"""
import os
import subprocess
import sys
import tempfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from tide_cpp.replay import POLICIES, replay, synthetic_trace  # noqa: E402

POLICY_ID = {"gpu": 0, "cpu": 1, "static": 2, "swap": 3, "tide": 4}

# stdin: L E F policy tau expert_bytes has_pop / budgets[L] / [pop[L*E]] / F lines "kind step
# hits[L*E]"; stdout: per layer "promoted demoted h2d device host budget resident[E]".
DRIVER = r"""
#include "residency.h"
#include <stdio.h>
#include <stdlib.h>
int main(void){
  int L,E,F,pol,tau,haspop; unsigned long long xb;
  if(scanf("%d %d %d %d %d %llu %d",&L,&E,&F,&pol,&tau,&xb,&haspop)!=7) return 2;
  int32_t *b=malloc(L*4); for(int i=0;i<L;i++) scanf("%d",&b[i]);
  tide_residency r; if(residency_init(&r,L,E,pol,b,tau,xb)){printf("ERR %s\n",residency_error(&r));return 1;}
  if(haspop){ float *p=malloc(L*E*4); for(int i=0;i<L*E;i++) scanf("%f",&p[i]); if(residency_set_popularity(&r,p,L*E)){printf("ERR %s\n",residency_error(&r));return 1;} }
  int32_t *h=malloc(E*4);
  for(int f=0;f<F;f++){ int kind,step; scanf("%d %d",&kind,&step);
    for(int l=0;l<L;l++){ for(int e=0;e<E;e++) scanf("%d",&h[e]); tide_residency_plan p;
      if(residency_plan(&r,l,h,kind==0,kind==0?step:0,&p)){printf("ERR %s\n",residency_error(&r));return 1;} } }
  for(int l=0;l<L;l++){ const tide_residency_counters*c=residency_counters(&r,l);
    printf("%llu %llu %llu %llu %llu %d", (unsigned long long)c->experts_promoted,(unsigned long long)c->experts_demoted,(unsigned long long)c->h2d_bytes,(unsigned long long)c->device_expert_tokens,(unsigned long long)c->host_expert_tokens,residency_budget(&r,l));
    for(int e=0;e<E;e++) printf(" %d", residency_slot(&r,l,e)>=0); printf("\n"); }
  residency_free(&r); return 0; }
"""


def build(tmp):
    src, exe = os.path.join(tmp, "drv.c"), os.path.join(tmp, "drv")
    with open(src, "w") as f:
        f.write(DRIVER)
    subprocess.run(["cc", "-std=c11", "-O1", "-g", "-D_GNU_SOURCE", "-fsanitize=address,undefined",
                    "-I" + os.path.join(ROOT, "native/include"), "-I" + os.path.join(ROOT, "native/src"),
                    src, os.path.join(ROOT, "native/src/residency.c"), "-o", exe, "-lm"], check=True)
    return exe


def core(exe, tr, pol, budgets, tau, pop):
    L, E = tr.n_layers, tr.n_expert
    lines = [f"{L} {E} {tr.n_forwards} {POLICY_ID[pol]} {tau} {tr.expert_bytes} {int(pop is not None)}",
             " ".join(map(str, budgets))]
    if pop is not None:
        lines.append(" ".join(map(str, pop.reshape(-1))))
    for f in range(tr.n_forwards):
        lines.append(f"{int(tr.kind[f])} {int(tr.step[f])} " + " ".join(map(str, tr.hits[f].reshape(-1))))
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0")
    out = subprocess.run([exe], input="\n".join(lines), capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stdout + out.stderr)
    return [list(map(int, ln.split())) for ln in out.stdout.strip().split("\n")]


def main(n_traces):
    rng = np.random.default_rng(0)
    n = bad = 0
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        for trial in range(n_traces):
            L, E = int(rng.integers(1, 4)), int(rng.integers(4, 40))
            tr = synthetic_trace(n_layers=L, n_expert=E, n_used=int(rng.integers(1, min(E, 8) + 1)),
                                 block_length=int(rng.integers(1, 12)), n_blocks=int(rng.integers(1, 4)),
                                 steps_per_block=int(rng.integers(1, 9)), skew=float(rng.uniform(0, 2)),
                                 seed=trial, expert_bytes=int(rng.integers(1, 1000)))
            for pol in POLICIES:
                budgets = rng.integers(0, E + 3, size=L)
                tau = int(rng.integers(1, 5))
                pop = None
                if pol == "static" and trial % 2:
                    pop = rng.integers(0, 5, size=(L, E)).astype(np.float32)
                want = replay(tr, pol, budgets, tau, popularity=pop)
                got = core(exe, tr, pol, budgets, tau, pop)
                for l in range(L):
                    t = want.layer_totals(l)
                    w = [t["experts_promoted"], t["experts_demoted"], t["h2d_bytes"],
                         t["device_expert_tokens"], t["host_expert_tokens"], t["budget"]]
                    w += want.resident[l].astype(int).tolist()
                    n += 1
                    if got[l] != w:
                        bad += 1
                        print(f"MISMATCH trace {trial} {pol} layer {l}: core {got[l]} replay {w}")
    print(f"{n} layer comparisons, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 60))
