"""The training loop of Algorithm 1, shared by train_cifar.py, train_imagenet.py and train_t2i.py.

training_loop() shows one iteration in order: the random numbers, the generator step every tau iterations
(TTUR), the critic step otherwise, EMA, logging, snapshots and checkpoints. Below it: one generator step and
one critic step as functions of the training state (the benchmark calls them too), then what sets the state
up. Flags live in flags.py, the run directory and checkpoints in rundir.py, DDP in distributed.py, the
method in fdistill.py.
"""

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import benchmark
import distributed
import fdistill
import rundir

#----------------------------------------------------------------------------
# What a script hands the loop. All networks speak EDM's denoiser convention (fdistill.py).

@dataclass
class Task:
    generator:      torch.nn.Module     # generator(z, cond) -> y, the one-step student G_theta.
    fake_score:     torch.nn.Module     # fake_score(x, sigma, cond) -> D(x), the online s_psi.
    head:           torch.nn.Module     # head(features) -> logits, trained part of D_lambda.
    teacher:        Callable            # teacher(x, sigma, cond, decoder) -> (D(x), features), frozen s_phi; decoder as in
                                        # edm_nets.EDMPrecond.forward_features ('no_grad': D(x) detached, 'skip': features only).
    cond:           Callable            # cond(indices) -> conditioning of dataset items (labels, text), on device.
    real:           Callable            # real(indices) -> clean real samples x ~ p_data, on the CPU (DataLoader workers call it).
    num_real:       int                 # Dataset size.
    z_shape:        tuple               # Shape of one latent z.
    to_images:      Callable            # to_images(y) -> uint8 NCHW, for sample grids.
    sigma_levels:   torch.Tensor        # Ascending 1000-level noise discretisation (DMD2).
    sigma_data:     float = 0.5         # EDM's sigma_data for the DSM weighting.
    dsm_weight:     Optional[Callable] = None   # dsm_weight(sigma) -> lambda(sigma) of the fake score's DSM; None = EDM's with sigma_data.
    meta:           dict = field(default_factory=dict)  # Extra checkpoint entries (generator_kwargs, sigma_init, head_kwargs).
    regression:     Optional[Callable] = None   # regression(generator, step) -> loss, DMD's optional regression term.
    captions:       Optional[Callable] = None   # captions(indices) -> list of str, written beside grids.

#----------------------------------------------------------------------------
# Algorithm 1.

def training_loop(opts, task, rank, world, device, resumed=None):
    run = rundir.Run(opts.outdir, rank)
    s = setup(opts, task, rank, world, device)
    start, nan_total, last_ckpt = restore(s, run, resumed)                 # --resume exactly, or --init-from
    if opts.benchmark:
        return benchmark.benchmark(s, run, draw, generator_step, critic_step)
    if start == 0:
        begin(s, run)                                                       # options, first log line, snapshot 0
    loader = iter(real_sample_loader(s, start))
    t_start, t_log, it_log, window, nan_run = time.time(), time.time(), start, [], 0
    for it in range(start, opts.iterations):                               # Alg. 1 line 2
        set_lr(s, it)
        generator_turn = it % opts.tau == 0                                 # TTUR (Alg. 1 line 5): generator every tau, critic otherwise
        draws = draw(s, it, generator_turn)                                 # Alg. 1 line 3: this iteration's random numbers
        if generator_turn:
            ok, stats = generator_step(s, draws)                            # Alg. 1 lines 4, 6-12
            if ok:
                update_ema(s, it)
        else:
            ok, stats = critic_step(s, draws, next(loader))                 # Alg. 1 lines 4, 14-15
        nan_total, nan_run = nan_total + (not ok), 0 if ok else nan_run + 1
        if nan_run >= opts.max_nan:
            raise FloatingPointError(diverged(f'{nan_run} non-finite losses in a row at iteration {it}', last_ckpt))
        window += stats
        done = it + 1
        if done % opts.log_every == 0 or done == opts.iterations:
            t_log, it_log, window = log_stats(s, run, window, done, t_log, it_log, nan_total), done, []
        if done % opts.snap_every == 0 or done == opts.iterations:
            snapshot(s, run, done)
        if done % opts.ckpt_every == 0 or done == opts.iterations:
            last_ckpt = checkpoint(s, run, done, nan_total, last_ckpt)
    run.log(f'Done: {opts.iterations - start} iterations in {(time.time() - t_start) / 3600:.2f} h, {nan_total} skipped steps')

#----------------------------------------------------------------------------
# The training state: everything an iteration reads and updates. setup() builds it from the flags and the task.

@dataclass
class State:
    opts:           object              # The flags (flags.parse_args).
    task:           Task                # Networks and data of the script.
    rank:           int                 # This process, of `world`.
    world:          int                 # Number of processes.
    device:         torch.device        # This process's device.
    batch_gpu:      int                 # Samples per process and accumulation round.
    slices:         list                # This process's rows of the global batch, one slice per accumulation round.
    div:            fdistill.Divergence # h(r) of --f (Table 1).
    levels:         torch.Tensor        # The task's noise levels, on device.
    ratio_norm:     fdistill.RatioNorm  # Clip and stage-1 bins of r (Alg. 1 lines 6-7), with the running bin means if --ratio-ema.
    generator:      torch.nn.Module     # G_theta (plain module).
    fake_score:     torch.nn.Module     # s_psi (plain module).
    head:           torch.nn.Module     # D_lambda's head (plain module).
    ema:            Optional[torch.nn.Module]   # EMA of the generator; None if --ema-halflife-kimg 0.
    ddp_generator:  torch.nn.Module     # The generator as the generator step calls it (DDP with several processes).
    ddp_fake_score: torch.nn.Module     # The fake score as the critic step trains it.
    ddp_head:       torch.nn.Module     # The head as the critic step trains it.
    opt_g:          torch.optim.Optimizer   # AdamW of the generator.
    opt_c:          torch.optim.Optimizer   # AdamW of fake score (group 0) and head (group 1).
    teacher:        Callable            # task.teacher; the benchmark swaps in a timed one.
    real_samples:   torch.utils.data.Dataset    # The real samples of each critic iteration.

    @property
    def rounds(self):
        return len(self.slices)

# The random numbers of one iteration, drawn whole for the global batch.
class Draws(NamedTuple):
    it:             int                 # The iteration.
    z:              torch.Tensor        # [B, ...] generator latents (Alg. 1 line 3, eps_i of line 4).
    indices:        torch.Tensor        # [B] dataset items: conditioning, and the real samples of a critic step.
    noise:          tuple               # fdistill.GeneratorNoise or fdistill.CriticNoise.

# Alg. 1 line 3. Iteration `it` draws the whole global batch from (seed, it) on every process and each
# process takes its slice: results do not depend on the number of GPUs, and resume is exact.
def draw(s, it, generator_turn):
    opts, shape, B = s.opts, s.task.z_shape, s.opts.batch
    g = iteration_generator(opts.seed, it, s.device)
    z = randn(g, B, shape, s.device)
    if generator_turn:
        sigma = fdistill.sample_sigma(s.levels, B, generator=g)                             # DMD2: levels 2%-98%
        noise = fdistill.GeneratorNoise(sigma, randn(g, B, shape, s.device))
    else:
        sigma_dsm = fdistill.sample_sigma(s.levels, B, lo=0, hi=1, generator=g)             # DSM over all levels (DMD2)
        sigma_gan = fdistill.sample_sigma(s.levels, B, generator=g)                         # same sigmas as r is read at
        noise_dsm, noise_fake, noise_real = [randn(g, B, shape, s.device) for _ in range(3)]
        noise_r1 = randn(g, B, shape, s.device) if opts.r1_approx > 0 else None
        noise = fdistill.CriticNoise(sigma_dsm, noise_dsm, sigma_gan, noise_fake, noise_real, noise_r1)
    return Draws(it, z, data_indices(opts.seed, it, s.task.num_real, B), noise)

def iteration_generator(seed, it, device):
    return torch.Generator(device).manual_seed(seed * 2 ** 32 + it)

# Which dataset items iteration `it` uses (global batch), from a CPU stream of its own, so DataLoader workers
# can read them ahead of the loop.
def data_indices(seed, it, num_real, batch):
    return torch.randint(num_real, (batch,), generator=torch.Generator().manual_seed(seed * 2 ** 32 + it + 2 ** 62))

def randn(g, batch, shape, device):
    return torch.randn((batch,) + tuple(shape), generator=g, device=device)

# This process's rows of a step's random numbers.
def rows(noise, sl):
    return type(noise)(*(None if v is None else v[sl] for v in noise))

#----------------------------------------------------------------------------
# One generator step (Alg. 1 lines 4, 6-12) and one critic step (lines 4, 14-15), each over the accumulation
# rounds of this process. Return (whether the optimiser stepped, the stats of each round).

def generator_step(s, draws, div=None):
    s.head.requires_grad_(False)
    stats, finite = [], True
    for k, sl in enumerate(s.slices):
        cond = s.task.cond(draws.indices[sl])
        with s.ddp_generator.no_sync() if (s.world > 1 and k < s.rounds - 1) else contextlib.nullcontext():
            with autocast(s):
                y = s.ddp_generator(draws.z[sl], cond)                                       # Alg. 1 line 4
                loss, st = fdistill.generator_loss(                                         # Alg. 1 lines 6-11
                    y           = y,
                    draws       = rows(draws.noise, sl),
                    teacher     = lambda x, sigma: s.teacher(x, sigma, cond, 'no_grad'),    # one pass; no decoder activations kept
                    fake_score  = lambda x, sigma: s.fake_score(x, sigma, cond),
                    head        = s.head,
                    div         = div or s.div,
                    ratio_norm  = s.ratio_norm,
                    w_gan       = s.opts.w_gan)
                if s.task.regression is not None:
                    loss_reg = s.task.regression(s.generator, draws.it * s.rounds + k)     # plain module: one DDP forward per backward
                    st['loss_reg'] = loss_reg.item()
                    loss = loss + loss_reg
            finite &= bool(torch.isfinite(loss))
            (loss / s.rounds).backward()
        stats.append(st)
    s.head.requires_grad_(True)
    return optimizer_step(s, s.opt_g, finite, stats, generator=s.generator), stats         # Alg. 1 line 12

def critic_step(s, draws, x_reals=None):
    x_reals = s.real_samples[draws.it] if x_reals is None else x_reals                     # from the DataLoader in training
    stats, finite = [], True
    for k, sl in enumerate(s.slices):
        cond = s.task.cond(draws.indices[sl])
        with contextlib.ExitStack() as no_sync:
            if s.world > 1 and k < s.rounds - 1:
                no_sync.enter_context(s.ddp_fake_score.no_sync())
                no_sync.enter_context(s.ddp_head.no_sync())
            with autocast(s):
                with torch.no_grad():
                    y = s.generator(draws.z[sl], cond)                                       # Alg. 1 line 4
                loss, st = fdistill.critic_loss(                                            # Alg. 1 lines 14-15
                    y           = y,
                    x_real      = x_reals[k].to(s.device, non_blocking=True),
                    draws       = rows(draws.noise, sl),
                    teacher     = lambda x, sigma: s.teacher(x, sigma, cond, 'skip'),       # the encoder only: features
                    fake_score  = lambda x, sigma: s.ddp_fake_score(x, sigma, cond),
                    head        = s.ddp_head,
                    gamma       = s.opts.r1_gamma,
                    r1_alpha    = s.opts.r1_approx,
                    sigma_data  = s.task.sigma_data,
                    dsm_weight  = s.task.dsm_weight,
                    edges       = s.ratio_norm.edges)
            finite &= bool(torch.isfinite(loss))
            (loss / s.rounds).backward()
        stats.append(st)
    return optimizer_step(s, s.opt_c, finite, stats, fake_score=s.fake_score, head=s.head), stats

# Optimiser step unless some process saw a non-finite loss or gradient; then skip it everywhere. Each
# network's gradient (all-reduced: the same on every process) is clipped to norm --grad-clip first, as
# DMD2 and FastGen do (10); stats get the norms before clipping.
def optimizer_step(s, opt, finite, stats, **nets):
    norms = {}
    for name, net in nets.items():
        grads = [p for p in net.parameters() if p.grad is not None]
        norms[f'grad_norm_{name}'] = torch.nn.utils.clip_grad_norm_(grads, s.opts.grad_clip or float('inf')).item()
    finite &= all(np.isfinite(list(norms.values())))
    ok = fdistill.all_reduce(torch.tensor([float(finite)], device=s.device), dist.ReduceOp.MIN).item() > 0
    if ok:
        opt.step()
    opt.zero_grad(set_to_none=True)
    stats.append(norms)
    return ok

def autocast(s):
    return torch.autocast(s.device.type, dtype=torch.bfloat16, enabled=s.opts.precision == 'bf16')

#----------------------------------------------------------------------------
# What the loop does around the two steps: learning rate, EMA, logs, grids, snapshots, checkpoints.

# --lr for the generator and fake score, --lr-head for the head (opt_c's second group); --lr2 rescales all.
def set_lr(s, it):
    opts = s.opts
    second = opts.lr2 is not None and it >= opts.lr2_at
    lr = opts.lr2 if second else opts.lr
    lr_head = opts.lr2 * (1 if opts.lr_head == opts.lr else opts.lr_head / opts.lr) if second else opts.lr_head
    s.opt_g.param_groups[0]['lr'] = s.opt_c.param_groups[0]['lr'] = lr
    s.opt_c.param_groups[1]['lr'] = lr_head

# The generator's EMA after each generator step, with a half-life in images of generator steps.
def update_ema(s, it):
    if s.ema is None:
        return
    beta = ema_beta(s.opts.batch, (it // s.opts.tau) * s.opts.batch, s.opts.ema_halflife_kimg, s.opts.ema_rampup)
    # One foreach call, as torch.optim.swa_utils.get_ema_multi_avg_fn does (one fused kernel per chunk of tensors on
    # CUDA; a loop of the same lerp_ on the CPU, so CPU values equal the per-parameter loop's bit for bit).
    with torch.no_grad():
        torch._foreach_lerp_(list(s.ema.parameters()), list(s.generator.parameters()), 1 - beta)

# EMA decay of one generator step, as EDM's training loop: the half-life is ramp-up x images the generator has
# seen before this step, up to the preset's, so a short run's EMA follows the generator (its first step copies it).
def ema_beta(batch, nimg, halflife_kimg, rampup):
    halflife_nimg = min(halflife_kimg * 1000, nimg * rampup) if rampup > 0 else halflife_kimg * 1000
    return 0.5 ** (batch / max(halflife_nimg, 1e-8))

# A new run: its options, one line saying what runs, and the generator as it starts (a FID curve begins where the run did).
def begin(s, run):
    opts = s.opts
    run.write_json('training_options.json', dict(vars(opts), world_size=s.world, batch_gpu=s.batch_gpu, rounds=s.rounds))
    run.log(f'f-distill with {s.div.name} (--f {opts.f}): {opts.iterations} iterations, batch {opts.batch} = {s.world} x {s.batch_gpu} x {s.rounds} rounds')
    snapshot(s, run, 0)

# One stats.jsonl line and one log line: the mean of each stat over the window since the last, speed, ETA, memory.
def log_stats(s, run, window, done, t_log, it_log, nan_total):
    opts, t_now = s.opts, time.time()
    sec_per_it = (t_now - t_log) / (done - it_log)
    entry = dict(iteration=done, kimg=done * opts.batch / 1000, sec_per_it=sec_per_it,
                 images_per_sec=opts.batch / sec_per_it, eta_hours=sec_per_it * (opts.iterations - done) / 3600,
                 nan_total=nan_total, memory_gb=distributed.memory_gb(s.device), lr=s.opt_g.param_groups[0]['lr'], lr_head=s.opt_c.param_groups[1]['lr'])
    for key in sorted({k for st in window for k in st}):
        entry[key] = float(np.mean([st[key] for st in window if key in st]))
    run.append_stats(entry)
    run.log(f'it {done}/{opts.iterations}  {entry["images_per_sec"]:.1f} img/s  ETA {entry["eta_hours"]:.2f} h  '
            + '  '.join(f'{k} {entry[k]:.4g}' for k in ('loss_fdistill', 'loss_dsm', 'loss_gan_d', 'disc_acc', 'h_ess', 'r_mean') if k in entry))
    return t_now

def diverged(what, last_ckpt):
    return f'{what}; stopping. Last good checkpoint: {last_ckpt or "none yet"}. Try a lower --lr or --r-max, or --precision fp32.'

# A snapshot is what evaluate.py needs to rebuild the generator; a checkpoint adds what resuming needs.
def snapshot_state(s, it):
    return dict(iteration=it, options=vars(s.opts), **s.task.meta,
        generator=unwrap_net(s.generator).state_dict(),
        generator_ema=unwrap_net(s.ema).state_dict() if s.ema is not None else None)

def snapshot(s, run, it):
    grid(s, run, it)
    run.save_checkpoint(snapshot_state(s, it), None, prefix='snapshot')

# A checkpoint every --ckpt-every iterations, the last --keep kept; returns its path.
def checkpoint(s, run, it, nan_total, last_ckpt):
    state = dict(snapshot_state(s, it), nan_total=nan_total, world_size=s.world, batch_gpu=s.batch_gpu,
        fake_score=unwrap_net(s.fake_score).state_dict(), head=s.head.state_dict(),
        opt_g=s.opt_g.state_dict(), opt_c=s.opt_c.state_dict(), **ratio_means_to_save(s.ratio_norm.running))
    try:
        run.save_checkpoint(state, s.opts.keep)
    except FloatingPointError as err:
        raise FloatingPointError(diverged(str(err), last_ckpt)) from None
    return os.path.join(s.opts.outdir, f'checkpoint-{it:07d}.pt')

# A sample grid from fixed latents (and fixed dataset items' conditioning), EMA weights if kept: rank 0 builds it
# (plain modules, no collectives) in chunks of --batch-gpu; the others go on to the next iteration.
def grid(s, run, it):
    opts, task, bg = s.opts, s.task, s.batch_gpu
    if s.rank != 0:
        return
    net = s.ema if s.ema is not None else s.generator
    g = torch.Generator(s.device).manual_seed(opts.seed + 12345)
    z = randn(g, opts.grid, task.z_shape, s.device)
    indices = torch.from_numpy(np.linspace(0, task.num_real - 1, opts.grid).astype(np.int64))
    with torch.no_grad(), autocast(s):
        images = torch.cat([task.to_images(net(z[i:i + bg], task.cond(indices[i:i + bg]))) for i in range(0, opts.grid, bg)])
    run.save_grid(images, it, task.captions(indices) if task.captions is not None else None)

#----------------------------------------------------------------------------
# Setting up: networks on the device, EMA, optimisers, DDP, this process's share of the batch, real samples.

def setup(opts, task, rank, world, device):
    batch_gpu, rounds = batch_split(opts, world)
    levels = task.sigma_levels.to(device)
    ratio_means = torch.full([opts.num_bins], float('nan'), dtype=torch.float64, device=device) if opts.ratio_ema > 0 else None
    ratio_norm = fdistill.RatioNorm(opts.r_min, opts.r_max, fdistill.sigma_bin_edges(levels, opts.num_bins), ratio_means, opts.ratio_ema)
    generator, fake_score, head = task.generator.to(device), task.fake_score.to(device), task.head.to(device)
    ema = copy.deepcopy(generator).eval().requires_grad_(False) if opts.ema_halflife_kimg > 0 else None
    opt_g = torch.optim.AdamW(generator.parameters(), lr=opts.lr, weight_decay=opts.wd)
    opt_c = torch.optim.AdamW([dict(params=fake_score.parameters()), dict(params=head.parameters(), lr=opts.lr_head)], lr=opts.lr, weight_decay=opts.wd)
    # DDP. The critic step sees the fake score and head through DDP; the generator step sees the
    # generator through DDP and calls the head's plain module with its parameters frozen. Gradients are views
    # into DDP's all-reduce buckets (no second copy of them); every trainable parameter gets a gradient in
    # every step (the tasks freeze what their networks never use), so DDP need not search the graph for unused ones.
    if world > 1:
        ddp = lambda net: DDP(net, device_ids=[device.index] if device.type == 'cuda' else None, gradient_as_bucket_view=True)
        ddp_generator, ddp_fake_score, ddp_head = ddp(generator), ddp(fake_score), ddp(head)
    else:
        ddp_generator, ddp_fake_score, ddp_head = generator, fake_score, head
    slices = [slice((k * world + rank) * batch_gpu, (k * world + rank + 1) * batch_gpu) for k in range(rounds)]   # this process's share
    return State(opts=opts, task=task, rank=rank, world=world, device=device, batch_gpu=batch_gpu, slices=slices,
        div=fdistill.divergence(opts.f), levels=levels, ratio_norm=ratio_norm, generator=generator, fake_score=fake_score, head=head,
        ema=ema, ddp_generator=ddp_generator, ddp_fake_score=ddp_fake_score, ddp_head=ddp_head, opt_g=opt_g, opt_c=opt_c,
        teacher=task.teacher, real_samples=RealSamples(task.real, opts.seed, task.num_real, opts.batch, slices))

# Samples per GPU per round, and accumulation rounds.
def batch_split(opts, world):
    if opts.batch % world:
        raise ValueError(f'--batch {opts.batch} must be a multiple of the number of GPUs ({world})')
    batch_gpu = opts.batch_gpu or opts.batch // world
    rounds = opts.batch // (world * batch_gpu)
    if rounds * world * batch_gpu != opts.batch:
        raise ValueError(f'--batch {opts.batch} must be a multiple of GPUs ({world}) x --batch-gpu ({batch_gpu})')
    return batch_gpu, rounds

# The real samples x ~ p_data of one critic iteration (Alg. 1 line 15) that this process uses: one tensor per
# accumulation round, read by DataLoader workers (pinned for the copy to the GPU).
class RealSamples(torch.utils.data.Dataset):
    def __init__(self, real, seed, num_real, batch, slices):
        self.real, self.seed, self.num_real, self.batch, self.slices = real, seed, num_real, batch, slices

    def __getitem__(self, it):
        indices = data_indices(self.seed, it, self.num_real, self.batch)
        return [self.real(indices[sl]) for sl in self.slices]

# The critic iterations' real samples from `start` on, read ahead by --workers processes.
def real_sample_loader(s, start):
    opts = s.opts
    return torch.utils.data.DataLoader(s.real_samples, sampler=[i for i in range(start, opts.iterations) if i % opts.tau],
        batch_size=None, num_workers=opts.workers, pin_memory=s.device.type == 'cuda', prefetch_factor=2 if opts.workers else None)

# Resume exactly, or warm start from another run (rundir.start_state checked it before the networks were built).
# Returns (first iteration, non-finite steps so far, last checkpoint).
def restore(s, run, resumed):
    opts = s.opts
    path, state, kind = resumed if resumed is not None else rundir.start_state(opts, run, (s.world, s.batch_gpu))
    start, nan_total, last_ckpt = 0, 0, None
    if kind == 'resume':
        check_networks(path, state, s, 'generator')
        load_networks(state, s.generator, s.fake_score, s.head)
        s.opt_g.load_state_dict(state['opt_g'])
        s.opt_c.load_state_dict(state['opt_c'])
        if s.ema is not None:
            unwrap_net(s.ema).load_state_dict(state['generator_ema'])
        start, nan_total, last_ckpt = state['iteration'], state['nan_total'], path
        if s.ratio_norm.running is not None and state.get('ratio_means') is not None:
            s.ratio_norm.running.copy_(ratio_means_from(state))
        run.log(f'Resumed from {path} at iteration {start}')
    elif opts.resume:
        run.log(f'No checkpoint in {opts.outdir} yet: the run starts over from iteration 0')
    if opts.resume:
        run.truncate_stats(start)
    if kind == 'init':
        warm_start(s, run, path, state)
    if not opts.benchmark:
        run.remove_partial_files()
    return start, nan_total, last_ckpt

# --init-from: the networks of another run. Its generator is the EMA when the file has one (the weights evaluate.py
# scores, and fid --snapshots ranks), unless --init-from-weights raw; the new run's EMA starts from it too.
def warm_start(s, run, path, state):
    key = 'generator_ema' if s.opts.init_from_weights == 'ema' and state.get('generator_ema') is not None else 'generator'
    check_networks(path, state, s, key)
    load_networks(state, s.generator, s.fake_score, s.head, key)
    if s.ema is not None:
        unwrap_net(s.ema).load_state_dict(state[key])
    run.log(f'Warm start from {path} (iteration {state["iteration"]} of that run; generator: its '
            + ('EMA' if key == 'generator_ema' else 'raw weights') + ', --init-from-weights chooses'
            + ('' if 'fake_score' in state else '; a snapshot: fake score and head start as in a new run') + ')')

# Checkpoints hold the denoiser inside each wrapper (e.g. OneStepGenerator.net), as evaluate.py rebuilds it.
def unwrap_net(module):
    return getattr(module, 'net', module)

def load_networks(state, generator, fake_score, head, key='generator'):
    unwrap_net(generator).load_state_dict(state[key])
    if 'fake_score' in state:                   # a snapshot holds the generator only
        unwrap_net(fake_score).load_state_dict(state['fake_score'])
        head.load_state_dict(state['head'])

# A checkpoint of another architecture or resolution is one line naming the file and the first difference,
# before load_state_dict would raise its page of missing keys and sizes.
def check_networks(path, state, s, key):
    nets = [(key, s.generator)] + ([('fake_score', s.fake_score), ('head', s.head)] if 'fake_score' in state else [])
    for name, net in nets:
        own, theirs = unwrap_net(net).state_dict(), state[name]
        for k in list(own) + [k for k in theirs if k not in own]:
            diff = (f'{k} is missing' if k not in theirs else f'{k} is not in this run\'s network' if k not in own else
                    f'{k} has shape {list(theirs[k].shape)}, this run\'s {list(own[k].shape)}' if theirs[k].shape != own[k].shape else None)
            if diff is not None:
                raise ValueError(f'{path} holds another architecture or resolution than this run (its {name}: {diff}); '
                                 'pass a checkpoint of the same --teacher and --resolution')

# The running stage-1 bin means (--ratio-ema) are saved as means and a mask of the bins seen so far: a bin not yet
# reached has no mean, which the NaN of fdistill.normalize_ratio says in memory, and a checkpoint never holds a NaN.
def ratio_means_to_save(running):
    if running is None:
        return dict(ratio_means=None)
    seen = ~torch.isnan(running)
    return dict(ratio_means=torch.where(seen, running, 0.0), ratio_seen=seen)

def ratio_means_from(state):
    return torch.where(state['ratio_seen'], state['ratio_means'], float('nan'))

#----------------------------------------------------------------------------
# A script's whole run: processes, precision, the task's networks and data, the loop.

def main(opts, build_task):
    rank, world, device = distributed.init_distributed()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts.precision != 'fp32'
    batch_gpu, _ = batch_split(opts, world)
    distributed.on_rank0(lambda: rundir.claim(opts.outdir))    # one run per directory, claimed before anything is written
    opts.teacher_sha256 = distributed.broadcast(rundir.teacher_digest(opts) if rank == 0 and not opts.benchmark else None)
    resumed = rundir.start_state(opts, rundir.Run(opts.outdir, rank), (world, batch_gpu))
    distributed.barrier()                       # every rank has checked --outdir before rank 0 writes to it
    torch.manual_seed(opts.seed)                # The head's initial weights.
    task = build_task(opts, device, rank, world)
    training_loop(opts, task, rank, world, device, resumed)
    distributed.close_distributed()

#----------------------------------------------------------------------------
