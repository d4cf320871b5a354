"""--benchmark: seconds per generator step and per critic step, each split into its parts, and peak memory.

The training loop's steps run as they are; the timing is attached from outside. Forward hooks on the generator,
fake score and head and a timed stand-in for the teacher time the network passes, optimiser hooks time AdamW's
step, each with the device synchronised around it; the backward part is the rest of the step (the backward
passes, gradient clipping, the loss arithmetic). FLOPs per step are torch.utils.flop_counter's count of one
untimed step of each kind (recomputation of checkpointed blocks included); on CUDA, model FLOPs utilisation is
their rate over the device's dense peak. Writes benchmark.json into the run directory.
"""

import collections
import dataclasses
import json
import time

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

import distributed
import fdistill
import memory_plan

#----------------------------------------------------------------------------
# Seconds spent in each part, while `on`.

class Parts:
    def __init__(self, device):
        self.device, self.on, self.sec, self.t0 = device, False, collections.Counter(), {}

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def start(self, name):
        if self.on:
            self.sync()
            self.t0[name] = time.perf_counter()

    def stop(self, name):
        if self.on:
            self.sync()
            self.sec[name] += time.perf_counter() - self.t0[name]

    # Forward hooks on a module; pre- and post-step hooks on an optimiser.
    def attach(self, name, obj):
        if isinstance(obj, torch.optim.Optimizer):
            return [obj.register_step_pre_hook(lambda *_: self.start(name)), obj.register_step_post_hook(lambda *_: self.stop(name))]
        return [obj.register_forward_pre_hook(lambda *_: self.start(name)), obj.register_forward_hook(lambda *_: self.stop(name))]

    # A callable that is not a module (the task's teacher): the same timing around each call.
    def timed(self, name, fn):
        def call(*args):
            self.start(name)
            out = fn(*args)
            self.stop(name)
            return out
        return call

    # The step's total minus its timed parts: the backward passes and everything between the parts.
    def split(self, total):
        parts = dict(self.sec)
        parts['backward'] = total - sum(parts.values())
        self.sec.clear()
        return dict(sorted(parts.items()))

#----------------------------------------------------------------------------
# FLOPs and utilisation.

# Dense tensor-core peaks in TFLOP/s by --precision, from NVIDIA's datasheets (their sparse figures halved), matched
# in this order against torch.cuda.get_device_name(); fp32 is the plain (non-tensor-core) rate. H200 = H100 SXM's.
PEAK_TFLOPS = [
    ('H100 PCIe',   dict(bf16=756.0, tf32=378.0, fp32=51.0)),
    ('H100',        dict(bf16=989.4, tf32=494.7, fp32=66.9)),
    ('H200',        dict(bf16=989.4, tf32=494.7, fp32=66.9)),
    ('A100',        dict(bf16=312.0, tf32=156.0, fp32=19.5)),
]

def peak_tflops(device, precision, given=None):
    if device.type != 'cuda':
        return None
    if given:
        return given
    name = torch.cuda.get_device_name(device)
    return next((peaks[precision] for key, peaks in PEAK_TFLOPS if key in name), None)

# FLOPs of one step as FlopCounterMode counts them, in a step of its own: the mode keeps checkpointed blocks'
# recomputed tensors alive until it exits, which the timed steps and their memory must not see. Its module tracker
# cannot hook exact R1's leaf input (memory_plan.leaf_inputs_unhooked).
def count_flops(step, *args):
    with memory_plan.leaf_inputs_unhooked(), FlopCounterMode(display=False) as counter:
        step(*args)
    return counter.get_total_flops()

#----------------------------------------------------------------------------
# Seconds per generator step (f-distill and reverse-KL on the same model) and per critic step, each
# split into its parts, and peak memory. The ratio of the two generator steps is the price of the
# weighting: logits are computed anyway. f and reverse-KL steps alternate and medians are reported, so
# drift in machine load cancels; critic steps run apart, since what a step follows (e.g. R1's large
# buffers being freed) changes its time. R1's cost (its double backward is inside the backward pass) is
# the critic step with gamma minus the same step without, alternated.

def benchmark(s, run, draw, generator_step, critic_step):
    opts, device = s.opts, s.device
    parts = Parts(device)
    hooks = [h for name, obj in (('generator', s.generator), ('fake_score', s.fake_score), ('head', s.head),
                                 ('optimiser', s.opt_g), ('optimiser', s.opt_c)) for h in parts.attach(name, obj)]
    s = dataclasses.replace(s, teacher=parts.timed('teacher', s.teacher))

    def timed(step, *args):
        parts.sync()
        t0 = time.perf_counter()
        step(s, *args)
        parts.sync()
        return time.perf_counter() - t0

    def peak_memory(kind):
        if device.type == 'cuda':
            result[f'memory_gb_{kind}'] = distributed.memory_gb(device)
            torch.cuda.reset_peak_memory_stats(device)

    div_f, div_rkl = fdistill.divergence(opts.f), fdistill.divergence('rkl')
    n, gamma, result = opts.benchmark, opts.r1_gamma, {}
    generator_step(s, draw(s, 0, True), div_f), generator_step(s, draw(s, 0, True), div_rkl)    # Warm-up.
    flops_g, flops_c = count_flops(generator_step, s, draw(s, 0, True), div_f), count_flops(critic_step, s, draw(s, 1, False))
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    parts.on = True
    t_f, t_rkl = [], []
    for i in range(1, n + 1):                   # ABBA order: neither kind always runs first.
        for div, times in ((div_f, t_f), (div_rkl, t_rkl))[::1 if i % 2 else -1]:
            times.append(timed(generator_step, draw(s, i, True), div))
    result['sec_parts_generator_step'] = {k: v / (2 * n) for k, v in parts.split(sum(t_f) + sum(t_rkl)).items()}
    peak_memory('generator_step')
    parts.on = False
    critic_step(s, draw(s, 1, False))
    parts.on = True
    t_c = [timed(critic_step, draw(s, i, False)) for i in range(2, n + 2)]
    result['sec_parts_critic_step'] = {k: v / n for k, v in parts.split(sum(t_c)).items()}
    peak_memory('critic_step')
    parts.on = False
    if gamma > 0:
        t_with, t_without = [], []
        for i in range(2, n + 2):
            for opts.r1_gamma, times in ((gamma, t_with), (0, t_without))[::1 if i % 2 else -1]:
                times.append(timed(critic_step, draw(s, i, False)))
        opts.r1_gamma = gamma
        result['sec_r1'] = float(np.median(t_with) - np.median(t_without))
    for h in hooks:
        h.remove()
    t_f, t_rkl, t_c = np.median(t_f), np.median(t_rkl), np.median(t_c)
    t_it = (t_f + (opts.tau - 1) * t_c) / opts.tau
    flops_it = (flops_g + (opts.tau - 1) * flops_c) / opts.tau                              # this process's, per iteration
    peak = peak_tflops(device, opts.precision, opts.peak_tflops)
    result = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu', world_size=s.world,
                  batch=opts.batch, precision=opts.precision, f=opts.f, steps=opts.benchmark, sec_generator_step=t_f,
                  sec_generator_step_rkl=t_rkl, sec_critic_step=t_c, ratio_f_over_rkl=t_f / t_rkl,
                  images_per_sec=opts.batch / t_it, memory_gb=distributed.memory_gb(device),
                  flops_generator_step=flops_g, flops_critic_step=flops_c, peak_tflops=peak,
                  mfu=flops_it / t_it / (peak * 1e12) if peak else None, **result)
    run.write_json('benchmark.json', result)
    run.log(json.dumps(result))
    return result

#----------------------------------------------------------------------------
