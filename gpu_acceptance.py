"""GPU acceptance in one command: ImageNet-64 and SD v1.5 at their per-GPU batch, measured against --plan.

    python gpu_acceptance.py --out acceptance.json          # one GPU, ~5 minutes, nothing downloaded

Each case runs the train script's --benchmark in one process with NCCL initialised (a world of one, as torchrun
would start it) on the released architecture with random weights (--random-teacher), and --plan for the same
flags with --gpus 1. The JSON holds, per case: images/s, FLOPs per step and model FLOPs utilisation (benchmark.py),
peak torch.cuda.max_memory_allocated per step kind beside the plan's figure and their ratio (the plan should land
within 15 %), and the attention kernels that ran (CUDA kernel names from torch.profiler over one generator step).
--dry-run checks the flags and writes the JSON's layout without running anything (CI, no GPU).
"""

import argparse
import contextlib
import json
import os
import sys
import tempfile
from unittest import mock

import torch

import distributed
import flags
import plan
import train_edm
import train_imagenet
import train_t2i
import training_loop

# (name, script, flags): Table 5's per-GPU batches on 8 GPUs for ImageNet-64; SD at 16 per GPU (a slice of its 128).
CASES = [
    ('imagenet64_bf16', 'imagenet', ['--batch', '64', '--precision', 'bf16']),
    ('sd15_bf16_grad_ckpt', 't2i', ['--batch', '16', '--precision', 'bf16', '--grad-ckpt']),
]

def parse(script, argv):
    if script == 'imagenet':
        return flags.parse_args(train_imagenet.__doc__, train_imagenet.PRESET, train_edm.add_edm_args, argv)
    return flags.parse_args(train_t2i.__doc__, train_t2i.PRESET, train_t2i.add_t2i_args, argv)

def build(script):
    if script == 'imagenet':
        return lambda opts, device, rank, world: train_edm.build_task(opts, train_imagenet.PRESET, device, rank, world)
    return train_t2i.build_task

# The attention kernels among the CUDA kernels of one generator step: flash, memory-efficient, cuDNN or the math
# path (a plain softmax kernel between matmuls).
ATTENTION_KERNELS = dict(flash='flash', efficient='fmha', cudnn='cudnn', math='softmax')

def attention_kernels(opts, build_task):
    s = training_loop.setup(opts, build_task(opts, torch.device('cuda'), 0, 1), 0, 1, torch.device('cuda'))
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        training_loop.generator_step(s, training_loop.draw(s, 0, True))
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return {kind: sorted(n for n in names if key in n.lower()) for kind, key in ATTENTION_KERNELS.items()}

def run_case(name, script, extra, steps, outdir):
    common = extra + ['--random-teacher', '--outdir', os.path.join(outdir, name)]
    planned_run = plan.main(parse(script, common + ['--plan', '--gpus', '1']), build(script))
    opts = parse(script, common + ['--benchmark', str(steps)])
    training_loop.main(opts, build(script))                    # initialises and closes NCCL (a world of one)
    bench = json.load(open(os.path.join(opts.outdir, 'benchmark.json')))
    memory = {}
    for kind in ('generator_step', 'critic_step'):
        planned, measured = planned_run['kinds'][kind]['total'] / 2 ** 30, bench[f'memory_gb_{kind}']
        memory[kind] = dict(measured_gib=measured, planned_gib=planned, planned_over_measured=planned / measured)
    return dict(images_per_sec=bench['images_per_sec'], mfu=bench['mfu'], peak_tflops=bench['peak_tflops'],
                flops_generator_step=bench['flops_generator_step'], flops_critic_step=bench['flops_critic_step'],
                memory=memory, within_15_percent=all(abs(m['planned_over_measured'] - 1) <= 0.15 for m in memory.values()),
                attention_kernels=attention_kernels(opts, build(script)), plan_wall_s=planned_run['wall_s'], benchmark=bench)

# torchrun's variables for a world of one while the cases run, restored after: a caller's later subprocesses
# (the test suite's) must not inherit them and join a process group on a stale port.
def world_of_one(active):
    if not active:
        return contextlib.nullcontext()
    return mock.patch.dict(os.environ, RANK='0', LOCAL_RANK='0', WORLD_SIZE='1', MASTER_ADDR='127.0.0.1', MASTER_PORT=str(distributed.free_port()))

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--out',     default='acceptance.json',  help='JSON file written')
    p.add_argument('--steps',   default=5, type=flags.positive_int, help='Timed steps of each kind (benchmark.py)')
    p.add_argument('--only',    default=None, choices=[c[0] for c in CASES], help='Run one case')
    p.add_argument('--dry-run', action='store_true',        help='Check the flags, write the layout, run nothing')
    args = p.parse_args(argv)
    cases = [c for c in CASES if args.only in (None, c[0])]
    for name, script, extra in cases:                           # every case's flags parse before anything runs
        parse(script, extra + ['--random-teacher', '--benchmark', str(args.steps)])
    if not args.dry_run and not torch.cuda.is_available():
        sys.exit('gpu_acceptance.py: error: needs a CUDA GPU (--dry-run checks the flags without one)')
    result = dict(device=torch.cuda.get_device_name() if torch.cuda.is_available() else None, torch=torch.__version__, cases={})
    with tempfile.TemporaryDirectory() as outdir, world_of_one(not args.dry_run):
        for name, script, extra in cases:
            result['cases'][name] = None if args.dry_run else run_case(name, script, extra, args.steps, outdir)
            print(name, json.dumps(result['cases'][name], default=str)[:2000], flush=True)
    with open(args.out, 'w') as f:
        json.dump(result, f, indent=2, default=str)
    return result

if __name__ == '__main__':
    main()
