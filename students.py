"""What a run leaves behind, read back for evaluation: its checkpoints and snapshots found and checked, the one-step
student rebuilt (EMA weights if kept), the EDM teacher loaded from its pickle, and per-seed latents split over ranks.

Used by evaluate.py (sampling, metrics), read_run.py (the Fig. 5 diagnostic) and export.py.
"""

import glob
import json
import os
import time

import torch

import rundir
from distributed import get_rank, get_world_size, print0

#----------------------------------------------------------------------------
# Run checkpoints. A missing file is one line naming it and the fix.

def check_file(path, what, hint):
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f'{what} "{path}" not found: {hint}')

# A file (a checkpoint or a generator snapshot), or a run directory: its latest checkpoint, else its latest snapshot.
def find_checkpoint(path):
    if os.path.isfile(path):
        return path
    found = (sorted(glob.glob(os.path.join(path, 'checkpoint-*.pt'))) or snapshots_of(path)) if os.path.isdir(path) else []
    if not found:
        raise FileNotFoundError(f'No run checkpoint at "{path}": pass a run directory holding checkpoint-<iteration>.pt or snapshot-<iteration>.pt files, or one such file')
    return found[-1]

def snapshots_of(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, 'snapshot-*.pt')))

# EDM runs (train_cifar.py, train_imagenet.py) and text-to-image runs (train_t2i.py) share training_loop.py's
# checkpoint and snapshot (a checkpoint's generator part); a 'unet_config' entry marks the latter. Memory-mapped:
# only the tensors used are read (an SD checkpoint also holds the fake score and both optimisers' states).
EDM_KEYS = ('generator_kwargs', 'sigma_init', 'generator')
T2I_KEYS = ('unet_config', 'generator', 'sd', 'options')

def is_t2i(ckpt):
    return ckpt is not None and 'unet_config' in ckpt

def sd_folder(args, ckpt):
    return args.sd or (ckpt or {}).get('sd')

def load_checkpoint(path):
    path = find_checkpoint(path)
    ckpt = rundir.load_checkpoint(path, mmap=True)
    missing = [k for k in (T2I_KEYS if is_t2i(ckpt) else EDM_KEYS) if ckpt.get(k) is None]
    if missing:
        kind = 'a text-to-image generator (train_t2i.py)' if is_t2i(ckpt) else 'an EDM generator'
        raise ValueError(f'"{path}" is not an f-distill run checkpoint of {kind}: it has no {", ".join(missing)}')
    ckpt['path'] = path
    return ckpt

# Class-balanced labels: seed s gets class s % label_dim, one-hot (EDM convention); None if unconditional.
def class_labels(seeds, label_dim, device):
    if label_dim == 0:
        return None
    return torch.eye(label_dim, device=device)[torch.as_tensor(seeds, device=device) % label_dim]

#----------------------------------------------------------------------------
# EDM. A run's checkpoint rebuilds the student as edm_nets.EDMPrecond(**generator_kwargs) (the EMA weights if
# the run kept them) wrapped in the one-step generator G(z) = D(sigma_init z; sigma_init); the teacher comes
# from an official EDM pickle.

def load_generator(ckpt, device):
    import edm_nets
    net = edm_nets.EDMPrecond(**ckpt['generator_kwargs'])
    net.load_state_dict(ckpt['generator_ema'] if ckpt.get('generator_ema') is not None else ckpt['generator'])
    return edm_nets.OneStepGenerator(net, ckpt['sigma_init']).eval().requires_grad_(False).to(device)

TEACHER_HINT = 'pass the EDM .pkl the run was distilled from (e.g. edm-cifar10-32x32-cond-vp.pkl) with --teacher'

def load_teacher(path, device):
    import edm_pickle
    check_file(path, 'Teacher pickle', TEACHER_HINT)
    return edm_pickle.load_edm_pickle(path)['ema'].eval().requires_grad_(False).to(device)


#----------------------------------------------------------------------------
# Per-seed generation across ranks.

# Seeds split across ranks in EDM's way, so every rank runs the same number of (possibly empty) batches.
def rank_batches(seeds, batch_size):
    world_size = get_world_size()
    num_batches = max((len(seeds) - 1) // (batch_size * world_size) + 1, 1) * world_size
    return [b.tolist() for b in torch.as_tensor(seeds, dtype=torch.int64).tensor_split(num_batches)[get_rank() :: world_size]]

def latents(shape, seeds, device):
    import edm_nets
    if not seeds:
        return torch.zeros([0, *shape], device=device), None
    rnd = edm_nets.StackedRandomGenerator(device, seeds)
    return rnd.randn([len(seeds), *shape], device=device), rnd

class Progress:
    def __init__(self, total, label=''):
        self.total, self.label, self.done = total, label, 0
        self.start = self.last = time.time()

    def update(self, n):
        self.done = min(self.done + n * get_world_size(), self.total)
        if time.time() - self.last > 10 or self.done == self.total:
            self.last = time.time()
            rate = self.done / max(self.last - self.start, 1e-9)
            print0(f'{self.label}{self.done}/{self.total} images  {rate:.1f} images/s  ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s')


# JSON reports and configs, written atomically (the folder created).
def write_json(path, data):
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))


#----------------------------------------------------------------------------
