"""The training loop of Algorithm 1, shared by train_cifar.py, train_imagenet.py and train_t2i.py.

A script builds a Task (networks and data) and its Table 5 preset; everything else is here:
flags, torchrun DDP, the Alg. 1 schedule, checkpoints and exact resume, logs, grids, the benchmark.
"""

import argparse
import collections
import contextlib
import copy
import gc
import glob
import json
import math
import os
import re
import resource
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import PIL.Image
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP

import fdistill

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
# Flags. Each script passes its Table 5 preset as the defaults.

# A bad flag is one line too, like every other user error; the usage is in --help.
class ArgumentParser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(2, f'{self.prog}: error: {message} (see --help)\n')

PRECISIONS = ('fp32', 'tf32', 'bf16')

def parse_args(description, preset, add_task_args=None, argv=None):
    p = ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--outdir',          default=preset['outdir'],   help='Run directory (created; holds checkpoints, logs, grids)')
    p.add_argument('--f',               default=preset['f'],        help='f-divergence: rkl, srkl, js, hellinger, fkl, jeffreys or sba:<lambda> (Table 1)')
    p.add_argument('--batch',           default=preset['batch'],    type=positive_int, help='Global batch size B (Table 5)')
    p.add_argument('--batch-gpu',       default=None,               type=positive_int, help='Samples per GPU per round; the rest is gradient accumulation (default: all of its share)')
    p.add_argument('--iterations',      default=preset['iterations'], type=positive_int, help='Total iterations M (Table 5)')
    p.add_argument('--tau',             default=preset['tau'],      type=int,   help='Generator update every tau iterations, critic otherwise (Alg. 1 line 5)')
    p.add_argument('--w-gan',           default=preset['w_gan'],    type=non_negative_float, help='GAN loss weight in the generator loss (Alg. 1 line 12)')
    p.add_argument('--lr',              default=preset['lr'],       type=non_negative_float, help='Adam learning rate of generator and fake score, and of the head unless --lr-head (Table 5)')
    p.add_argument('--lr-head',         default=None,               type=non_negative_float, help='Adam learning rate of the discriminator head (default: --lr, Table 5); --lr2 rescales it by lr2 / lr')
    p.add_argument('--lr2',             default=preset.get('lr2'),  type=non_negative_float, help='Second-stage learning rate (ImageNet fine-tuning, Table 5); off if unset')
    p.add_argument('--lr2-at',          default=preset.get('lr2_at', 0), type=int, help='Iteration at which --lr2 takes over')
    p.add_argument('--wd',              default=1e-2,               type=non_negative_float, help='AdamW weight decay (Table 5)')
    p.add_argument('--r1-gamma',        default=preset['r1_gamma'], type=non_negative_float, help='R1 penalty weight gamma on noised real inputs (Table 5)')
    p.add_argument('--r1-approx',       default=preset.get('r1_approx', 0.0), type=non_negative_float, help='R1 by finite differences with perturbation alpha * N(0, I) (FastGen); 0 = exact R1 (double backward)')
    p.add_argument('--r-min',           default=preset.get('r_min', 1e-2), type=float, help='Lower clip of the density ratio r (Alg. 1 line 6)')
    p.add_argument('--r-max',           default=preset.get('r_max', 1e2),  type=float, help='Upper clip of the density ratio r (Alg. 1 line 6)')
    p.add_argument('--num-bins',        default=10,                 type=positive_int, help='Sigma bins of the stage-1 ratio normalisation (Sec. 4)')
    p.add_argument('--ratio-ema',       default=0.0,                type=non_negative_float, help='EMA decay of the stage-1 per-bin ratio means across iterations (FastGen: 0.5 on ImageNet-64); 0 = this batch only')
    p.add_argument('--disc-res',        default=preset['disc_res'], type=str,   help='Teacher feature resolutions the discriminator reads, e.g. 32,16,8 (Table 5)')
    p.add_argument('--ema-halflife-kimg', default=preset.get('ema_halflife_kimg', 0), type=non_negative_float, help='EMA half-life of the generator in kimg of generator-step images; 0 = off')
    p.add_argument('--ema-rampup',      default=preset.get('ema_rampup', 0.05), type=non_negative_float, help='EMA ramp-up: the half-life is at most this times the images the generator has seen (EDM: 0.05); 0 = off')
    p.add_argument('--seed',            default=0,                  type=int,   help='Seed of all randomness (every iteration draws from seed and iteration)')
    p.add_argument('--log-every',       default=preset.get('log_every', 50), type=positive_int, help='Iterations between stats.jsonl lines')
    p.add_argument('--snap-every',      default=preset.get('snap_every', 1000), type=positive_int, help='Iterations between generator snapshots (EMA and raw weights, all kept) and sample grids')
    p.add_argument('--ckpt-every',      default=preset.get('ckpt_every', 1000), type=positive_int, help='Iterations between checkpoints')
    p.add_argument('--keep',            default=3,                  type=positive_int, help='Checkpoints kept (oldest deleted)')
    p.add_argument('--grid',            default=64,                 type=positive_int, help='Images in each sample grid (fixed seeds)')
    p.add_argument('--resume',          default=None, nargs='?', const='latest', help='Continue a run with the same flags: a checkpoint file, or the latest intact one in --outdir')
    p.add_argument('--init-from',       default=None,               help='Warm start generator, fake score and head from another run\'s checkpoint (a snapshot: the generator only)')
    p.add_argument('--precision',       default=None, choices=PRECISIONS, help=f'Network passes in fp32, tf32 (TF32 on CUDA) or bf16 (autocast + TF32); weights, optimiser state, losses, r stay fp32 (default: {preset.get("precision", "fp32")} on CUDA, fp32 on CPU)')
    p.add_argument('--grad-clip',       default=10.0,               type=non_negative_float, help='Clip each network\'s gradient norm (generator, fake score, head) to this; 0 = off (DMD2, FastGen: 10)')
    p.add_argument('--workers',         default=2,                  type=non_negative_int, help='DataLoader processes per GPU reading real samples ahead of the loop; 0 = in the loop')
    p.add_argument('--max-nan',         default=20,                 type=positive_int, help='Stop after this many non-finite losses in a row')
    p.add_argument('--benchmark',       default=0,                  type=int,   help='Time this many steps of each kind, write benchmark.json, exit')
    if add_task_args is not None:
        add_task_args(p)
    opts = p.parse_args(argv)
    fdistill.divergence(opts.f)     # Unknown --f: one clear error before anything runs.
    try:
        opts.disc_res = [positive_int(r) for r in str(opts.disc_res).split(',')]
    except (ValueError, argparse.ArgumentTypeError):
        p.error(f'--disc-res {opts.disc_res}: expected resolutions separated by commas, e.g. 32,16,8')
    if not 0 < opts.r_min < 1 < opts.r_max < math.inf:
        p.error('--r-min must lie in (0, 1) and --r-max above 1')
    opts.lr_head = opts.lr if opts.lr_head is None else opts.lr_head
    if opts.lr2 is not None and opts.lr_head != opts.lr and opts.lr <= 0:
        p.error('--lr-head with --lr2 needs --lr > 0: the head keeps the ratio lr_head / lr after --lr2-at')
    if opts.tau < 2:
        p.error('--tau must be at least 2: iterations with it % tau != 0 train the critic')
    if opts.benchmark < 0:
        p.error(f'--benchmark {opts.benchmark}: the number of timed steps cannot be negative')
    if opts.precision is None:
        opts.precision = preset.get('precision', 'fp32') if torch.cuda.is_available() else 'fp32'
    return opts

# argparse types: a count of zero or less, or a rate that is not finite, is an error, never "the default".
def positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'must be a positive integer, got {text}')
    return value

def non_negative_int(text):
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be an integer >= 0, got {text}')
    return value

def non_negative_float(text):
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f'must be a finite number >= 0, got {text}')
    return value

#----------------------------------------------------------------------------
# User errors end as one line. Our code raises ValueError, FileNotFoundError or FileExistsError (a bad flag or
# file) and FloatingPointError (a diverged run) with a message naming the flag or file and the fix; an entry
# point runs inside user_errors(), which prints `prog: error: message` once (rank 0) and exits with status 2,
# as argparse does. The same exception types raised inside a library are bugs and keep their traceback.

ROOT = os.path.dirname(os.path.abspath(__file__))
USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, FloatingPointError)

class UserExit(SystemExit):
    def __init__(self, message):
        super().__init__(2)
        self.message = message

    def __str__(self):
        return self.message

def raised_by_us(err):
    tb = err.__traceback__
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.dirname(os.path.abspath(tb.tb_frame.f_code.co_filename)) == ROOT

@contextlib.contextmanager
def user_errors(prog):
    try:
        yield
    except USER_ERRORS as err:
        if not raised_by_us(err):
            raise
        message = f'{prog}: error: ' + ' '.join(str(err).splitlines())
        if int(os.environ.get('RANK', 0)) == 0:
            print(message, file=sys.stderr, flush=True)
        if dist.is_initialized():
            dist.destroy_process_group()     # torchrun stops the other ranks when one exits non-zero
        raise UserExit(message) from None

#----------------------------------------------------------------------------
# torchrun DDP: NCCL on GPUs, gloo on CPU; plain `python script.py` runs as a world of one.

def init_distributed():
    if 'RANK' not in os.environ:
        return 0, 1, torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    local_rank = int(os.environ.get('LOCAL_RANK', 0))
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device = torch.device('cuda', local_rank)
    else:
        device = torch.device('cpu')
    dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return dist.get_rank(), dist.get_world_size(), device

def barrier():
    if dist.is_initialized():
        dist.barrier()

# A 2-process gloo run can abort at exit unless DDP modules go first (training_loop drops its own
# when it returns), then a barrier, then the group.
def close_distributed():
    gc.collect()
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

#----------------------------------------------------------------------------
# Random numbers. Iteration `it` draws the whole global batch from (seed, it) on every process and
# each process takes its slice: results do not depend on the number of GPUs, and resume is exact.

def iteration_generator(seed, it, device):
    return torch.Generator(device).manual_seed(seed * 2 ** 32 + it)

# Which dataset items iteration `it` uses (global batch), from a CPU stream of its own, so DataLoader workers
# can read them ahead of the loop.
def data_indices(seed, it, num_real, batch):
    return torch.randint(num_real, (batch,), generator=torch.Generator().manual_seed(seed * 2 ** 32 + it + 2 ** 62))

# The real samples x ~ p_data of one critic iteration (Alg. 1 line 15) that this process uses: one tensor per
# accumulation round, read by DataLoader workers (pinned for the copy to the GPU).
class RealSamples(torch.utils.data.Dataset):
    def __init__(self, real, seed, num_real, batch, slices):
        self.real, self.seed, self.num_real, self.batch, self.slices = real, seed, num_real, batch, slices

    def __getitem__(self, it):
        indices = data_indices(self.seed, it, self.num_real, self.batch)
        return [self.real(indices[sl]) for sl in self.slices]

def randn(g, batch, shape, device):
    return torch.randn((batch,) + tuple(shape), generator=g, device=device)

#----------------------------------------------------------------------------
# Run directory: options, log, stats, grids, atomic checkpoints.

class Run:
    def __init__(self, outdir, rank):
        self.outdir, self.rank = outdir, rank
        if rank == 0:
            os.makedirs(outdir, exist_ok=True)

    def log(self, msg):
        if self.rank == 0:
            print(msg, flush=True)
            with open(os.path.join(self.outdir, 'log.txt'), 'a') as f:
                f.write(msg + '\n')

    def write_json(self, name, obj):
        if self.rank == 0:
            atomic_write(os.path.join(self.outdir, name), lambda f: f.write(json.dumps(obj, indent=2).encode()))

    def append_stats(self, stats):
        if self.rank == 0:
            with open(os.path.join(self.outdir, 'stats.jsonl'), 'a') as f:
                f.write(json.dumps(stats) + '\n')

    # A killed run may have logged past its last checkpoint, or died while writing a line: a resume keeps
    # the complete lines up to its checkpoint.
    def truncate_stats(self, iteration):
        path = os.path.join(self.outdir, 'stats.jsonl')
        if self.rank == 0 and os.path.isfile(path):
            lines = []
            for line in open(path):
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry['iteration'] <= iteration:
                    lines.append(line.rstrip('\n') + '\n')
            atomic_write(path, lambda f: f.write(''.join(lines).encode()))

    def checkpoints(self):
        return sorted(glob.glob(os.path.join(self.outdir, 'checkpoint-*.pt')))

    # A run lives here if it left a checkpoint or any of its logs (a run killed before its first checkpoint).
    def holds_run(self):
        return bool(self.checkpoints()) or any(os.path.exists(os.path.join(self.outdir, name)) for name in RUN_FILES)

    # Partial files of writes that a kill interrupted (atomic_write's <name>.tmp<pid>).
    def remove_partial_files(self):
        if self.rank == 0:
            for path in glob.glob(os.path.join(self.outdir, '*.tmp*')):
                if re.search(r'\.tmp\d+$', path):
                    os.remove(path)
                    self.log(f'Removed {path}, the partial file of an interrupted write')

    # Full checkpoints (prefix 'checkpoint', the last `keep` kept) and generator snapshots ('snapshot', all kept).
    # Every rank checks, so all stop together; rank 0 writes.
    def save_checkpoint(self, state, keep, prefix='checkpoint'):
        bad = non_finite(state)
        if bad is not None:
            raise FloatingPointError(f'{bad} is not finite at iteration {state["iteration"]}')
        if self.rank != 0:
            return
        save_checkpoint(os.path.join(self.outdir, f'{prefix}-{state["iteration"]:07d}.pt'), state)
        for old in self.checkpoints()[:-keep] if prefix == 'checkpoint' else []:
            os.remove(old)

    def save_grid(self, images, it, captions=None):
        if self.rank != 0:
            return
        path = os.path.join(self.outdir, f'grid-{it:07d}.png')
        atomic_write(path, lambda f: image_grid(images).save(f, format='PNG'))
        if captions is not None:
            with open(path[:-4] + '.txt', 'w') as f:
                f.write('\n'.join(captions) + '\n')

def atomic_write(path, write):
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'wb') as f:
        write(f)
    os.replace(tmp, path)

def image_grid(images):
    n, c, h, w = images.shape
    cols = int(np.ceil(np.sqrt(n)))
    rows = (n + cols - 1) // cols
    grid = np.zeros((rows * h, cols * w, c), dtype=np.uint8)
    for i, img in enumerate(images.permute(0, 2, 3, 1).cpu().numpy()):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = img
    return PIL.Image.fromarray(grid[:, :, 0] if c == 1 else grid)

#----------------------------------------------------------------------------
# Checkpoints: one writer and one reader for everything saved (training checkpoints, evaluate.py's reads).
# A checkpoint carries a CRC-32 of all it holds (every tensor's bytes, the repr of every other value, in order);
# loading recomputes it, so zeroed or flipped bytes are reported, not trained on. No tensor in a checkpoint is
# ever NaN or infinite: such weights are refused when written and when read.

RUN_FILES = ('stats.jsonl', 'log.txt', 'training_options.json')

def state_checksum(obj, crc=0):
    if isinstance(obj, torch.Tensor):
        flat = obj.detach().cpu().contiguous().reshape(-1)
        crc = zlib.crc32(f'{flat.dtype}{tuple(obj.shape)}'.encode(), crc)
        return zlib.crc32(flat.view(torch.uint8).numpy(), crc)
    if isinstance(obj, dict):
        for key, value in obj.items():
            crc = state_checksum(value, zlib.crc32(repr(key).encode(), crc))
        return crc
    if isinstance(obj, (list, tuple)):
        for value in obj:
            crc = state_checksum(value, crc)
        return crc
    return zlib.crc32(repr(obj).encode(), crc)

# The name of the first floating-point tensor holding a NaN or an infinity, e.g. 'generator/model.enc.0.weight'.
def non_finite(obj, name=''):
    if isinstance(obj, torch.Tensor):
        return name if obj.is_floating_point() and not bool(torch.isfinite(obj).all()) else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for key, value in items:
        bad = non_finite(value, f'{name}/{key}' if name else str(key))
        if bad is not None:
            return bad
    return None

def save_checkpoint(path, state):
    bad = non_finite(state)
    if bad is not None:
        raise FloatingPointError(f'Not writing {path}: {bad} is not finite')
    state = dict(state, checksum=state_checksum(state))
    atomic_write(path, lambda f: torch.save(state, f))

def load_checkpoint(path, mmap=False):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Checkpoint not found: {path}')
    try:
        state = torch.load(path, map_location='cpu', weights_only=True, mmap=mmap)
    except Exception as err:                    # torch reports a damaged file in many ways; all mean the same here
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise ValueError(f'Checkpoint {path} is truncated or corrupt ({detail})') from None
    if not isinstance(state, dict):
        raise ValueError(f'{path} is not a checkpoint of training_loop.py (it holds a {type(state).__name__})')
    checksum = state.pop('checksum', None)      # None: written before checkpoints carried one
    if checksum is not None and checksum != state_checksum(state):
        raise ValueError(f'Checkpoint {path} fails its checksum: its bytes changed after it was written')
    bad = non_finite(state)
    if bad is not None:
        raise ValueError(f'Checkpoint {path}: {bad} is not finite')
    return state

#----------------------------------------------------------------------------
# The loop.

def training_loop(opts, task, rank, world, device, resumed=None):
    run = Run(opts.outdir, rank)
    batch_gpu, rounds = batch_split(opts, world)
    div = fdistill.divergence(opts.f)
    levels = task.sigma_levels.to(device)
    edges = fdistill.sigma_bin_edges(levels, opts.num_bins)
    generator, fake_score, head = task.generator.to(device), task.fake_score.to(device), task.head.to(device)
    ema = copy.deepcopy(generator).eval().requires_grad_(False) if opts.ema_halflife_kimg > 0 else None
    opt_g = torch.optim.AdamW(generator.parameters(), lr=opts.lr, weight_decay=opts.wd)
    opt_c = torch.optim.AdamW([dict(params=fake_score.parameters()), dict(params=head.parameters(), lr=opts.lr_head)], lr=opts.lr, weight_decay=opts.wd)
    start, nan_total, last_ckpt = 0, 0, None
    ratio_means = torch.full([opts.num_bins], float('nan'), dtype=torch.float64, device=device) if opts.ratio_ema > 0 else None

    # Resume exactly, or warm start from another run.
    path, state = resumed if resumed is not None else start_state(opts, run)
    if opts.resume and state is not None:
        load_networks(state, generator, fake_score, head)
        opt_g.load_state_dict(state['opt_g'])
        opt_c.load_state_dict(state['opt_c'])
        if ema is not None:
            unwrap_net(ema).load_state_dict(state['generator_ema'])
        start, nan_total, last_ckpt = state['iteration'], state['nan_total'], path
        if ratio_means is not None and state.get('ratio_means') is not None:
            ratio_means.copy_(state['ratio_means'])
        run.log(f'Resumed from {path} at iteration {start}')
    elif opts.resume:
        run.log(f'No checkpoint in {opts.outdir} yet: the run starts over from iteration 0')
    if opts.resume:
        run.truncate_stats(start)
    elif state is not None:
        load_networks(state, generator, fake_score, head)
        if ema is not None:
            unwrap_net(ema).load_state_dict(state['generator'])
        run.log(f'Warm start from {path} (iteration {state["iteration"]} of that run'
                + ('' if 'fake_score' in state else '; a snapshot: fake score and head start as in a new run') + ')')
    if not opts.benchmark:
        run.remove_partial_files()

    # DDP. The critic step sees the fake score and head through DDP; the generator step sees the
    # generator through DDP and calls the head's plain module with its parameters frozen.
    if world > 1:
        ids = [device.index] if device.type == 'cuda' else None
        ddp_generator = DDP(generator, device_ids=ids, find_unused_parameters=True)
        ddp_fake_score = DDP(fake_score, device_ids=ids, find_unused_parameters=True)
        ddp_head = DDP(head, device_ids=ids)
    else:
        ddp_generator, ddp_fake_score, ddp_head = generator, fake_score, head
    autocast = lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=opts.precision == 'bf16')
    slices = [slice((k * world + rank) * batch_gpu, (k * world + rank + 1) * batch_gpu) for k in range(rounds)]   # this process's share
    real_samples = RealSamples(task.real, opts.seed, task.num_real, opts.batch, slices)
    parts = Parts(device)

    def generator_step(it, f_div):
        head.requires_grad_(False)
        g = iteration_generator(opts.seed, it, device)
        z = randn(g, opts.batch, task.z_shape, device)
        sigma = fdistill.sample_sigma(levels, opts.batch, generator=g)            # DMD2: levels 2%-98%
        noise = randn(g, opts.batch, task.z_shape, device)
        indices = data_indices(opts.seed, it, task.num_real, opts.batch)
        stats, finite = [], True
        for k, sl in enumerate(slices):
            cond = task.cond(indices[sl])
            with ddp_generator.no_sync() if (world > 1 and k < rounds - 1) else contextlib.nullcontext():
                with autocast():
                    y = parts('generator', ddp_generator)(z[sl], cond)                      # Alg. 1 line 4
                    loss, st = fdistill.generator_loss(y, sigma[sl], noise[sl],                # Alg. 1 lines 6-11
                        parts('teacher', lambda x, s: task.teacher(x, s, cond, 'no_grad')),    # one pass; no decoder activations kept
                        parts('fake_score', lambda x, s: fake_score(x, s, cond)), parts('head', head),
                        f_div, opts.r_min, opts.r_max, edges, opts.w_gan, ratio_means, opts.ratio_ema)
                    if task.regression is not None:
                        loss_reg = task.regression(generator, it * rounds + k)     # plain module: one DDP forward per backward
                        st['loss_reg'] = loss_reg.item()
                        loss = loss + loss_reg
                finite &= bool(torch.isfinite(loss))
                parts('backward', (loss / rounds).backward)()
            stats.append(st)
        head.requires_grad_(True)
        return step(opt_g, finite, stats, generator=generator), stats

    def critic_step(it, x_reals=None):
        x_reals = real_samples[it] if x_reals is None else x_reals     # from the DataLoader in training
        g = iteration_generator(opts.seed, it, device)
        z = randn(g, opts.batch, task.z_shape, device)
        sigma_dsm = fdistill.sample_sigma(levels, opts.batch, lo=0, hi=1, generator=g)  # DSM over all levels (DMD2)
        sigma_gan = fdistill.sample_sigma(levels, opts.batch, generator=g)               # same sigmas as r is read at
        noise_dsm, noise_fake, noise_real = [randn(g, opts.batch, task.z_shape, device) for _ in range(3)]
        indices = data_indices(opts.seed, it, task.num_real, opts.batch)
        noise_r1 = randn(g, opts.batch, task.z_shape, device) if opts.r1_approx > 0 else None
        stats, finite = [], True
        for k, sl in enumerate(slices):
            cond = task.cond(indices[sl])
            x_real = x_reals[k].to(device, non_blocking=True)
            with contextlib.ExitStack() as no_sync:
                if world > 1 and k < rounds - 1:
                    no_sync.enter_context(ddp_fake_score.no_sync())
                    no_sync.enter_context(ddp_head.no_sync())
                with autocast():
                    with torch.no_grad():
                        y = parts('generator', generator)(z[sl], cond)                      # Alg. 1 line 4
                    loss, st = fdistill.critic_loss(y, x_real, sigma_dsm[sl], noise_dsm[sl],    # Alg. 1 lines 14-15
                        sigma_gan[sl], noise_fake[sl], noise_real[sl],
                        parts('teacher', lambda x, s: task.teacher(x, s, cond, 'skip')),       # the encoder only: features
                        parts('fake_score', lambda x, s: ddp_fake_score(x, s, cond)), parts('head', ddp_head),
                        opts.r1_gamma, task.sigma_data, edges, task.dsm_weight, opts.r1_approx, noise_r1[sl] if noise_r1 is not None else None)
                finite &= bool(torch.isfinite(loss))
                parts('backward', (loss / rounds).backward)()
            stats.append(st)
        return step(opt_c, finite, stats, fake_score=fake_score, head=head), stats

    # Optimiser step unless some process saw a non-finite loss or gradient; then skip it everywhere. Each
    # network's gradient (all-reduced: the same on every process) is clipped to norm --grad-clip first, as
    # DMD2 and FastGen do (10); stats get the norms before clipping.
    def step(opt, finite, stats, **nets):
        t0 = parts.start()
        norms = {}
        for name, net in nets.items():
            grads = [p for p in net.parameters() if p.grad is not None]
            norms[f'grad_norm_{name}'] = torch.nn.utils.clip_grad_norm_(grads, opts.grad_clip or float('inf')).item()
        finite &= all(np.isfinite(list(norms.values())))
        ok = fdistill.all_reduce(torch.tensor([float(finite)], device=device), dist.ReduceOp.MIN).item() > 0
        if ok:
            opt.step()
        opt.zero_grad(set_to_none=True)
        stats.append(norms)
        parts.stop('optimiser', t0)
        return ok

    # --lr for the generator and fake score, --lr-head for the head (opt_c's second group); --lr2 rescales all.
    def set_lr(it):
        second = opts.lr2 is not None and it >= opts.lr2_at
        lr = opts.lr2 if second else opts.lr
        lr_head = opts.lr2 * (1 if opts.lr_head == opts.lr else opts.lr_head / opts.lr) if second else opts.lr_head
        opt_g.param_groups[0]['lr'] = opt_c.param_groups[0]['lr'] = lr
        opt_c.param_groups[1]['lr'] = lr_head

    # A snapshot is what evaluate.py needs to rebuild the generator; a checkpoint adds what resuming needs.
    def snapshot_state(it):
        return dict(iteration=it, options=vars(opts), **task.meta,
            generator=unwrap_net(generator).state_dict(),
            generator_ema=unwrap_net(ema).state_dict() if ema is not None else None)

    def checkpoint_state(it):
        return dict(snapshot_state(it), nan_total=nan_total,
            fake_score=unwrap_net(fake_score).state_dict(), head=head.state_dict(),
            opt_g=opt_g.state_dict(), opt_c=opt_c.state_dict(), ratio_means=ratio_means)

    def snapshot(it):
        grid(it)
        run.save_checkpoint(snapshot_state(it), None, prefix='snapshot')

    def grid(it):
        net = ema if ema is not None else generator
        g = torch.Generator(device).manual_seed(opts.seed + 12345)
        z = randn(g, opts.grid, task.z_shape, device)
        indices = torch.from_numpy(np.linspace(0, task.num_real - 1, opts.grid).astype(np.int64))
        with torch.no_grad(), autocast():
            images = torch.cat([task.to_images(net(z[i:i + batch_gpu], task.cond(indices[i:i + batch_gpu]))) for i in range(0, opts.grid, batch_gpu)])
        run.save_grid(images, it, task.captions(indices) if task.captions is not None else None)

    if opts.benchmark:
        return benchmark(opts, run, generator_step, critic_step, parts, device, world)

    # Alg. 1 line 2: for iteration in 0..M.
    if start == 0:
        run.write_json('training_options.json', dict(vars(opts), world_size=world, batch_gpu=batch_gpu, rounds=rounds))
        run.log(f'f-distill with {div.name} (--f {opts.f}): {opts.iterations} iterations, batch {opts.batch} = {world} x {batch_gpu} x {rounds} rounds')
        snapshot(0)                             # the generator as it starts: a FID curve begins where the run did
    t_start, t_log, it_log = time.time(), time.time(), start
    window, nan_run = [], 0
    loader = iter(torch.utils.data.DataLoader(real_samples, sampler=[i for i in range(start, opts.iterations) if i % opts.tau],
        batch_size=None, num_workers=opts.workers, pin_memory=device.type == 'cuda', prefetch_factor=2 if opts.workers else None))
    for it in range(start, opts.iterations):
        set_lr(it)
        if it % opts.tau == 0:                                                              # Alg. 1 line 5
            ok, stats = generator_step(it, div)
            if ok and ema is not None:
                beta = ema_beta(opts.batch, (it // opts.tau) * opts.batch, opts.ema_halflife_kimg, opts.ema_rampup)
                with torch.no_grad():
                    for p_ema, p in zip(ema.parameters(), generator.parameters()):
                        p_ema.lerp_(p, 1 - beta)
        else:
            ok, stats = critic_step(it, next(loader))
        nan_total += not ok
        nan_run = 0 if ok else nan_run + 1
        if nan_run >= opts.max_nan:
            raise FloatingPointError(f'{nan_run} non-finite losses in a row at iteration {it}; stopping. '
                                     f'Last good checkpoint: {last_ckpt or "none yet"}. Try a lower --lr or --r-max, or --precision fp32.')
        window += stats
        done = it + 1
        if done % opts.log_every == 0 or done == opts.iterations:
            t_now = time.time()
            sec_per_it = (t_now - t_log) / (done - it_log)
            entry = dict(iteration=done, kimg=done * opts.batch / 1000, sec_per_it=sec_per_it,
                         images_per_sec=opts.batch / sec_per_it, eta_hours=sec_per_it * (opts.iterations - done) / 3600,
                         nan_total=nan_total, memory_gb=memory_gb(device), lr=opt_g.param_groups[0]['lr'], lr_head=opt_c.param_groups[1]['lr'])
            for key in sorted({k for st in window for k in st}):
                entry[key] = float(np.mean([st[key] for st in window if key in st]))
            run.append_stats(entry)
            run.log(f'it {done}/{opts.iterations}  {entry["images_per_sec"]:.1f} img/s  ETA {entry["eta_hours"]:.2f} h  '
                    + '  '.join(f'{k} {entry[k]:.4g}' for k in ('loss_fdistill', 'loss_dsm', 'loss_gan_d', 'disc_acc', 'h_ess', 'r_mean') if k in entry))
            window, t_log, it_log = [], t_now, done
        if done % opts.snap_every == 0 or done == opts.iterations:
            snapshot(done)
        if done % opts.ckpt_every == 0 or done == opts.iterations:
            try:
                run.save_checkpoint(checkpoint_state(done), opts.keep)
            except FloatingPointError as err:
                raise FloatingPointError(f'{err}; stopping. Last good checkpoint: {last_ckpt or "none yet"}. Try a lower --lr or --r-max, or --precision fp32.') from None
            last_ckpt = os.path.join(opts.outdir, f'checkpoint-{done:07d}.pt')
    run.log(f'Done: {opts.iterations - start} iterations in {(time.time() - t_start) / 3600:.2f} h, {nan_total} skipped steps')

# EMA decay of one generator step, as EDM's training loop: the half-life is ramp-up x images the generator has
# seen before this step, up to the preset's, so a short run's EMA follows the generator (its first step copies it).
def ema_beta(batch, nimg, halflife_kimg, rampup):
    halflife_nimg = min(halflife_kimg * 1000, nimg * rampup) if rampup > 0 else halflife_kimg * 1000
    return 0.5 ** (batch / max(halflife_nimg, 1e-8))

# Samples per GPU per round, and accumulation rounds.
def batch_split(opts, world):
    if opts.batch % world:
        raise ValueError(f'--batch {opts.batch} must be a multiple of the number of GPUs ({world})')
    batch_gpu = opts.batch_gpu or opts.batch // world
    rounds = opts.batch // (world * batch_gpu)
    if rounds * world * batch_gpu != opts.batch:
        raise ValueError(f'--batch {opts.batch} must be a multiple of GPUs ({world}) x --batch-gpu ({batch_gpu})')
    return batch_gpu, rounds

# Where a run starts, checked before any network is built: (checkpoint, its state) to resume or warm start from,
# or (None, None). Nothing in --outdir is overwritten by a new run.
def start_state(opts, run):
    if opts.benchmark:
        return None, None
    if run.holds_run() and not opts.resume:
        raise FileExistsError(f'{opts.outdir} already holds a run: pass --resume to continue it, or a new --outdir')
    if opts.resume:
        return resume_checkpoint(opts, run)
    if opts.init_from:
        return opts.init_from, load_checkpoint(opts.init_from)
    return None, None

# The checkpoint --resume continues from: a named file must be intact; the latest in --outdir that is intact,
# each damaged newer one reported in the log; (None, None) for a run killed before its first checkpoint.
# Exact resume needs the recipe the checkpoint was trained with.
RECIPE = ('f', 'seed', 'batch', 'tau', 'w_gan', 'lr', 'lr_head', 'lr2', 'lr2_at', 'wd', 'r1_gamma', 'r1_approx', 'r_min', 'r_max', 'num_bins',
          'ratio_ema', 'disc_res', 'ema_halflife_kimg', 'ema_rampup', 'grad_clip', 'precision', 'sigma_init', 'reg_weight', 'cfg', 'resolution')

def resume_checkpoint(opts, run):
    if opts.resume != 'latest':
        path, state = opts.resume, load_checkpoint(opts.resume)
    else:
        found = run.checkpoints()
        if not found and not run.holds_run():
            raise FileNotFoundError(f'--resume: no run in {opts.outdir} (no checkpoint-*.pt, no stats.jsonl); check --outdir')
        path = state = None
        for candidate in reversed(found):
            try:
                path, state = candidate, load_checkpoint(candidate)
                break
            except ValueError as err:
                run.log(f'Cannot resume from {candidate}: {err}; trying the one before')
        if found and state is None:
            raise ValueError(f'--resume: none of the {len(found)} checkpoints in {opts.outdir} is intact; pass --resume FILE or start a new --outdir')
    if state is None:
        return None, None
    changed = [k for k in RECIPE if k in state['options'] and getattr(opts, k, None) != state['options'][k]]
    if changed:
        flags = ' '.join(f'--{k.replace("_", "-")} {state["options"][k] if not isinstance(state["options"][k], list) else ",".join(map(str, state["options"][k]))}' for k in changed)
        raise ValueError(f'--resume: {path} was trained with {flags}; pass the same flags to continue it exactly, or --init-from it in a new --outdir')
    if state['iteration'] >= opts.iterations:
        raise ValueError(f'--resume: {path} is at iteration {state["iteration"]}, and --iterations is {opts.iterations}: pass a larger --iterations to train on')
    return path, state

#----------------------------------------------------------------------------
# A script's whole run: processes, precision, the task's networks and data, the loop.

def main(opts, build_task):
    rank, world, device = init_distributed()
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = opts.precision != 'fp32'
    batch_split(opts, world)
    resumed = start_state(opts, Run(opts.outdir, rank))
    barrier()                                   # every rank has checked --outdir before rank 0 writes to it
    torch.manual_seed(opts.seed)                # The head's initial weights.
    task = build_task(opts, device, rank, world)
    training_loop(opts, task, rank, world, device, resumed)
    close_distributed()

#----------------------------------------------------------------------------
# Helpers.

# Checkpoints hold the denoiser inside each wrapper (e.g. OneStepGenerator.net), as evaluate.py rebuilds it.
def unwrap_net(module):
    return getattr(module, 'net', module)

def load_networks(state, generator, fake_score, head):
    unwrap_net(generator).load_state_dict(state['generator'])
    if 'fake_score' in state:                   # a snapshot holds the generator only
        unwrap_net(fake_score).load_state_dict(state['fake_score'])
        head.load_state_dict(state['head'])

def memory_gb(device):
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20

# --benchmark: seconds spent in each part of a step (forward passes, backward, optimiser), the device
# synchronised around every part. Off (a plain call) in training.
class Parts:
    def __init__(self, device):
        self.device, self.on, self.sec = device, False, collections.Counter()

    def sync(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)

    def start(self):
        if self.on:
            self.sync()
        return time.perf_counter()

    def stop(self, name, t0):
        if self.on:
            self.sync()
            self.sec[name] += time.perf_counter() - t0

    def __call__(self, name, fn):
        def timed(*args):
            t0 = self.start()
            out = fn(*args)
            self.stop(name, t0)
            return out
        return timed if self.on else fn

# Seconds per generator step (f-distill and reverse-KL on the same model) and per critic step, each
# split into its parts, and peak memory. The ratio of the two generator steps is the price of the
# weighting: logits are computed anyway. f and reverse-KL steps alternate and medians are reported, so
# drift in machine load cancels; critic steps run apart, since what a step follows (e.g. R1's large
# buffers being freed) changes its time. R1's cost (its double backward is inside the backward pass) is
# the critic step with gamma minus the same step without, alternated.
def benchmark(opts, run, generator_step, critic_step, parts, device, world):
    def timed(fn):
        t0 = parts.start()
        fn()
        parts.sync()
        return time.perf_counter() - t0

    def peak_memory(kind):
        if device.type == 'cuda':
            result[f'memory_gb_{kind}'] = torch.cuda.max_memory_allocated(device) / 2 ** 30
            torch.cuda.reset_peak_memory_stats(device)

    def split(kind, num_steps):
        result[f'sec_parts_{kind}'] = {k: v / num_steps for k, v in sorted(parts.sec.items())}
        parts.sec.clear()

    div_f, div_rkl = fdistill.divergence(opts.f), fdistill.divergence('rkl')
    n, gamma, result = opts.benchmark, opts.r1_gamma, {}
    generator_step(0, div_f), generator_step(0, div_rkl)                                # Warm-up.
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    parts.on = True
    t_f, t_rkl = [], []
    for i in range(1, n + 1):                   # ABBA order: neither kind always runs first.
        for div, times in ((div_f, t_f), (div_rkl, t_rkl))[::1 if i % 2 else -1]:
            times.append(timed(lambda: generator_step(i, div)))
    split('generator_step', 2 * n)
    peak_memory('generator_step')
    parts.on = False
    critic_step(1)
    parts.on = True
    t_c = [timed(lambda: critic_step(i)) for i in range(2, n + 2)]
    split('critic_step', n)
    peak_memory('critic_step')
    if gamma > 0:
        t_with, t_without = [], []
        for i in range(2, n + 2):
            for opts.r1_gamma, times in ((gamma, t_with), (0, t_without))[::1 if i % 2 else -1]:
                times.append(timed(lambda: critic_step(i)))
        opts.r1_gamma = gamma
        result['sec_r1'] = float(np.median(t_with) - np.median(t_without))
        parts.sec.clear()
    parts.on = False
    t_f, t_rkl, t_c = np.median(t_f), np.median(t_rkl), np.median(t_c)
    t_it = (t_f + (opts.tau - 1) * t_c) / opts.tau
    result = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu', world_size=world,
                  batch=opts.batch, precision=opts.precision, f=opts.f, steps=opts.benchmark, sec_generator_step=t_f,
                  sec_generator_step_rkl=t_rkl, sec_critic_step=t_c, ratio_f_over_rkl=t_f / t_rkl,
                  images_per_sec=opts.batch / t_it, memory_gb=memory_gb(device), **result)
    run.write_json('benchmark.json', result)
    run.log(json.dumps(result))
    return result

#----------------------------------------------------------------------------
