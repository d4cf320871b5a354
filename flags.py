"""The command line of the train scripts: the flags with their Table 5 defaults and checks, and one-line user errors.

Each script (train_cifar.py, train_imagenet.py, train_t2i.py) passes its preset to parse_args(); every entry point,
evaluate.py's too, runs inside user_errors().
"""

import argparse
import contextlib
import math
import os
import sys

import torch
import torch.distributed as dist

import fdistill

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
    p.add_argument('--init-from-weights', default='ema', choices=('ema', 'raw'), help='The generator --init-from takes: its EMA when the file has one (what evaluate.py scores), or its raw weights')
    p.add_argument('--precision',       default=None, choices=PRECISIONS, help=f'Network passes in fp32, tf32 (TF32 matmuls on CUDA; on a CPU, fp32) or bf16 (autocast + TF32); weights, optimiser state, losses, r stay fp32 (default: {preset.get("precision", "fp32")} on CUDA, fp32 on CPU)')
    p.add_argument('--grad-clip',       default=10.0,               type=non_negative_float, help='Clip each network\'s gradient norm (generator, fake score, head) to this; 0 = off (DMD2, FastGen: 10)')
    p.add_argument('--workers',         default=2,                  type=non_negative_int, help='DataLoader processes per GPU reading real samples ahead of the loop; 0 = in the loop')
    p.add_argument('--max-nan',         default=20,                 type=positive_int, help='Stop after this many non-finite losses in a row')
    p.add_argument('--benchmark',       default=0,                  type=int,   help='Time this many steps of each kind, write benchmark.json, exit')
    p.add_argument('--peak-tflops',     default=None,               type=non_negative_float, help='With --benchmark: the GPU\'s dense peak TFLOP/s at --precision, for model FLOPs utilisation where benchmark.PEAK_TFLOPS does not know the device')
    p.add_argument('--plan',            action='store_true',        help='Print each step\'s peak GPU memory, FLOPs and the largest --batch-gpu that fits, without a GPU or weights (plan.py), exit')
    p.add_argument('--gpus',            default=8,                  type=positive_int, help='With --plan: the number of GPUs the run will use')
    p.add_argument('--gpu-mem',         default=80.0,               type=non_negative_float, help='With --plan: memory of each GPU in GB (10^9 bytes, as sold)')
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
    if not opts.ratio_ema < 1:
        p.error(f'--ratio-ema {opts.ratio_ema}: the decay must lie in [0, 1) (1 would never update the bin means)')
    if opts.tau < 2:
        p.error('--tau must be at least 2: iterations with it % tau != 0 train the critic')
    if opts.benchmark < 0:
        p.error(f'--benchmark {opts.benchmark}: the number of timed steps cannot be negative')
    if opts.precision is None:
        opts.precision = preset.get('precision', 'fp32') if torch.cuda.is_available() or opts.plan else 'fp32'
    if opts.precision == 'tf32' and not torch.cuda.is_available() and not opts.plan and int(os.environ.get('RANK', 0)) == 0:
        print(f'{p.prog}: --precision tf32 on a CPU means fp32 (TF32 is a CUDA tensor-core format)', file=sys.stderr, flush=True)
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

def positive_float(text):
    value = float(text)
    if not 0 < value < math.inf:
        raise argparse.ArgumentTypeError(f'must be a finite number > 0, got {text}')
    return value

def non_negative_float(text):
    value = float(text)
    if not 0 <= value < math.inf:
        raise argparse.ArgumentTypeError(f'must be a finite number >= 0, got {text}')
    return value

#----------------------------------------------------------------------------
# User errors end as one line. Our code raises ValueError, FileNotFoundError or FileExistsError (a bad flag or
# file), OSError (a full disk) and FloatingPointError (a diverged run) with a message naming the flag or file and the fix; an entry
# point runs inside user_errors(), which prints `prog: error: message` once (rank 0) and exits with status 2,
# as argparse does. The same exception types raised inside a library are bugs and keep their traceback.

ROOT = os.path.dirname(os.path.abspath(__file__))
USER_ERRORS = (ValueError, OSError, FloatingPointError)

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
