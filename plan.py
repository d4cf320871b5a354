"""--plan: each step's peak GPU memory and FLOPs per GPU at the flags' batch, before launch and without a GPU.

The task's real networks are built on fake tensors (memory_plan.py: shapes, no data, no compute, no weights
loaded: --random-teacher's architecture, SD v1.5's configs), one generator step and one critic step of the
training loop run on this process's share of the batch under CUDA's autocast policy, then the sample grid.
Peak memory is affine in the batch (weights and states fixed, activations proportional), so the largest
--batch-gpu that fits follows from the one measured batch.

Left out (add them to the figures): the CUDA context and kernels (~0.5-1 GiB a process), cuBLAS/cuDNN
workspaces, NCCL's buffers, the caching allocator's rounding and fragmentation. Checked against real CPU
tensors in tests/test_memory_plan.py.
"""

import contextlib
import dataclasses
import math
import time

import torch

import memory_plan
import training_loop

GiB = memory_plan.GiB
GRADIENT_AS_BUCKET_VIEW = True          # As training_loop.setup builds DDP.

#----------------------------------------------------------------------------
# The state of one process of `--gpus` processes, on fake tensors.

# The networks are built where the fake tensors live, on the CPU; module.to() cannot swap a fake parameter for
# itself, so moving them is skipped while the task and the state are built.
@contextlib.contextmanager
def modules_stay():
    to = torch.nn.Module.to
    torch.nn.Module.to = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.nn.Module.to = to

class NoRun:                            # The grid's images go nowhere.
    def save_grid(self, *args, **kwargs):
        pass

def planned_state(opts, task, batch_gpu, rounds):
    s = training_loop.setup(opts, task, rank=0, world=1, device=torch.device('cpu'))
    for opt in (s.opt_g, s.opt_c):      # AdamW's implementation on CUDA tensors (fake tensors live on the CPU)
        for group in opt.param_groups:
            group['foreach'] = True
    # One round, or two with accumulation: the second round's forward pass runs beside the first's gradients.
    return dataclasses.replace(s, batch_gpu=batch_gpu, slices=[slice(0, batch_gpu)] * min(rounds, 2))

# Plan of one kind of step: its peak by category, plus `extra` bytes the tracker cannot see (category: bytes),
# FLOPs per round, and the largest --batch-gpu within `budget` bytes (the batch-proportional part scaled).
def plan_kind(s, step, modules, optimizers, extra, budget):
    p = memory_plan.plan_step(step, modules, optimizers)
    peak = {k: v + extra.get(k, 0) for k, v in dict(p.peak, ddp_buckets=0).items()}
    total = sum(peak.values())
    per_sample = (p.peak['activations'] + p.peak['temporaries'] + p.peak['other']) / s.batch_gpu
    largest = math.floor((budget - (total - per_sample * s.batch_gpu)) / per_sample) if per_sample > 0 else 0
    return dict(peak=peak, total=total, flops=p.flops // s.rounds, largest_batch_gpu=max(0, largest))

def plan(opts, build_task):
    t0, cpu0 = time.time(), time.process_time()
    world = opts.gpus
    batch_gpu, rounds = training_loop.batch_split(opts, world)
    budget = int(opts.gpu_mem * 1e9)                # GPU memory as sold: 80 GB = 74.5 GiB
    with memory_plan.fake_tensors():
        with modules_stay():
            task = build_task(opts, torch.device('cpu'), 0, 1)
            s = planned_state(opts, task, batch_gpu, rounds)
        nets = [s.generator, s.fake_score, s.head]
        tracked = nets + ([s.ema] if s.ema is not None else [])
        buckets = memory_plan.ddp_bucket_bytes(nets, world, GRADIENT_AS_BUCKET_VIEW)
        x_reals = [torch.randn((batch_gpu,) + tuple(task.z_shape))] * s.rounds     # real samples have the latents' shape
        # DDP's buckets live as long as the DDP modules. The generator step runs first, before the critic's AdamW
        # has states: those are added to its figures.
        critic_states = memory_plan.adamw_state_bytes([s.fake_score, s.head])
        gen = lambda: training_loop.generator_step(s, training_loop.draw(s, 0, True))
        critic = lambda: training_loop.critic_step(s, training_loop.draw(s, 1, False), x_reals)
        grid = lambda: training_loop.grid(s, NoRun(), 0)
        optimizers = [s.opt_g, s.opt_c]
        kinds = dict(
            generator_step = plan_kind(s, gen, tracked, optimizers, dict(ddp_buckets=buckets, optimiser=critic_states), budget),
            critic_step    = plan_kind(s, critic, tracked, optimizers, dict(ddp_buckets=buckets), budget),
            grid           = plan_kind(s, grid, tracked, optimizers, dict(ddp_buckets=buckets), budget))   # every state exists now
        # The grid runs no teacher: the tracker sees the parameters of the networks that run or that it is given only.
        unseen = max(kinds[k]['peak']['parameters'] for k in ('generator_step', 'critic_step')) - kinds['grid']['peak']['parameters']
        kinds['grid'].update(total=kinds['grid']['total'] + unseen, largest_batch_gpu=None)
        kinds['grid']['peak']['parameters'] += unseen
    return dict(gpus=world, gpu_mem_gb=opts.gpu_mem, batch=opts.batch, batch_gpu=batch_gpu, rounds=rounds, precision=opts.precision,
                kinds=kinds, wall_s=time.time() - t0, cpu_s=time.process_time() - cpu0)

#----------------------------------------------------------------------------
# What --plan prints.

def report(result, opts):
    budget = opts.gpu_mem * 1e9 / GiB
    lines = [f'Plan per GPU: {result["gpus"]} GPUs x {opts.gpu_mem:g} GB ({budget:.1f} GiB), batch {result["batch"]} = '
             f'{result["gpus"]} x {result["batch_gpu"]} x {result["rounds"]} rounds, {result["precision"]}']
    lines.append(f'{"":16}{"total":>8}' + ''.join(f'{k:>12}' for k in ('parameters', 'gradients', 'optimiser', 'activations', 'temporaries', 'ddp_buckets')) + f'{"TFLOP/round":>13}{"max --batch-gpu":>17}')
    for name, k in result['kinds'].items():
        p = k['peak']
        lines.append(f'{name:16}{k["total"] / GiB:8.1f}' + ''.join(f'{p[c] / GiB:12.1f}' for c in ('parameters', 'gradients', 'optimiser', 'activations', 'temporaries', 'ddp_buckets'))
                     + f'{k["flops"] / 1e12:13.1f}' + (f'{k["largest_batch_gpu"]:17d}' if k['largest_batch_gpu'] is not None else f'{"":17}'))
    lines.append('GiB at each step\'s peak (buffers in parameters); FLOPs as torch.utils.flop_counter counts them (recomputation included).')
    lines.append('Not included: CUDA context (~0.5-1 GiB), cuBLAS/cuDNN workspaces, NCCL buffers, allocator fragmentation.')
    worst = max(k['total'] for k in result['kinds'].values())
    steps = [k['largest_batch_gpu'] for n, k in result['kinds'].items() if n != 'grid']
    if worst > opts.gpu_mem * 1e9:
        fit = min(steps)
        advice = f'--batch-gpu {fit}' if fit > 0 else 'nothing: no --batch-gpu fits'
        if getattr(opts, 'grad_ckpt', True) is False:
            advice += ', or --grad-ckpt'
        lines.append(f'Does NOT fit {opts.gpu_mem:g} GB: peak {worst / GiB:.1f} GiB. Try {advice}.')
    else:
        lines.append(f'Fits: peak {worst / GiB:.1f} GiB of {budget:.1f} ({100 * (1 - worst / (opts.gpu_mem * 1e9)):.0f}% to spare).')
    lines.append(f'Planned in {result["wall_s"]:.0f} s ({result["cpu_s"]:.0f} CPU-s).')
    return '\n'.join(lines)

def main(opts, build_task):
    result = plan(opts, build_task)
    print(report(result, opts), flush=True)
    return result

#----------------------------------------------------------------------------
