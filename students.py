"""What a run leaves behind, read back for evaluation: its checkpoints and snapshots found and checked, the one-step
student rebuilt (EMA weights if kept), the EDM teacher loaded from its pickle, and per-seed latents split over ranks.

Used by evaluate.py (sampling, metrics), read_run.py (the Fig. 5 diagnostic) and export.py.
"""

import contextlib
import errno
import glob
import hashlib
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

# The weights a checkpoint's student is evaluated and exported with: the EMA if the run kept one.
def generator_weights(ckpt):
    return 'generator_ema' if ckpt.get('generator_ema') is not None else 'generator'

def load_generator(ckpt, device):
    import edm_nets
    net = edm_nets.EDMPrecond(**ckpt['generator_kwargs'])
    net.load_state_dict(ckpt[generator_weights(ckpt)])
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
    write_file(path, lambda f: f.write(json.dumps(data, indent=2).encode()))

#----------------------------------------------------------------------------
# Outputs. No command writes over one of its own inputs (paths compared after resolving links, and by inode);
# an output path is checked before any compute (an existing file where a folder goes, a folder where a file
# goes, a read-only folder, a name too long for the file system); a write that fails (a full disk) ends in one
# line naming the folder, and atomic_write leaves no partial file.

def same_file(a, b):
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False

# The outputs of `flag` (paths) against the inputs [(flag or description, path)]; a path None is skipped.
def check_not_inputs(flag, outputs, inputs):
    for out in outputs:
        for what, path in inputs:
            if out is not None and path is not None and same_file(out, path):
                raise ValueError(f'{flag}: "{out}" would be written over {what} "{path}", an input of this command: pass another {flag}')

def nearest_existing(path):
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path

# kind 'file' (written atomically: a temp file beside it first) or 'dir' (created, files written into it).
def check_output(flag, path, kind='file'):
    if kind == 'dir' and os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f'{flag} "{path}" is an existing file, not a folder: pass a folder')
    if kind == 'file' and os.path.isdir(path):
        raise FileExistsError(f'{flag} "{path}" is a folder: pass a file path')
    parent = nearest_existing(path if kind == 'dir' else os.path.dirname(os.path.abspath(path)))
    if not os.path.isdir(parent):
        raise FileExistsError(f'{flag} "{path}": "{parent}" is an existing file, not a folder: pass a path in a folder')
    name_max, path_max = os.pathconf(parent, 'PC_NAME_MAX'), os.pathconf(parent, 'PC_PATH_MAX')
    parts = [len(os.fsencode(part)) for part in os.path.abspath(path).split(os.sep)]
    parts[-1] += len(f'.tmp{os.getpid()}') if kind == 'file' else 0       # atomic_write's temp file beside it
    if max(parts) > name_max or len(os.fsencode(os.path.abspath(path))) + 32 > path_max:
        raise ValueError(f'{flag} "{path}" is too long for the file system ({name_max} bytes a name with its temp suffix, {path_max} a path): pass a shorter path')
    try:                                                    # the one reliable test of "can write here", root included
        with open(os.path.join(parent, f'.fdistill-write-test{os.getpid()}'), 'wb'):
            pass
        os.remove(os.path.join(parent, f'.fdistill-write-test{os.getpid()}'))
    except OSError as err:
        raise ValueError(f'{flag} "{path}": cannot write in "{parent}" ({os.strerror(err.errno)}): pass a writable folder') from None

# A write that fails for want of space, permission or a folder ends in one line naming the folder.
@contextlib.contextmanager
def output_errors(path):
    try:
        yield
    except OSError as err:
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EROFS, errno.ENAMETOOLONG, errno.ENOTDIR, errno.EEXIST, errno.EFBIG):
            raise
        folder = os.path.dirname(os.path.abspath(path))
        fix = 'free space there or pass' if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else 'pass'
        raise ValueError(f'Could not write "{path}": {os.strerror(err.errno)} in "{folder}"; nothing partial was left: {fix} another output path') from None

def write_file(path, write):
    with output_errors(path):
        if os.path.dirname(path):
            os.makedirs(os.path.dirname(path), exist_ok=True)
        rundir.atomic_write(path, write)

# What identifies a file's content without reading it: its size and modification time in ns (a rewrite, which our
# writers do by atomic replace, changes both); a folder of images: a digest of its files' names, sizes and times.
def file_key(path):
    if path is None:
        return None
    if os.path.isdir(path):
        digest = hashlib.sha1()
        for root, dirs, files in sorted(os.walk(path)):
            dirs.sort()
            for name in sorted(files):
                st = os.stat(os.path.join(root, name))
                digest.update(f'{os.path.relpath(os.path.join(root, name), path)}\0{st.st_size}\0{st.st_mtime_ns}\0'.encode())
        return dict(path=os.path.realpath(path), folder_digest=digest.hexdigest())
    st = os.stat(path)
    return dict(path=os.path.realpath(path), size=st.st_size, mtime_ns=st.st_mtime_ns)


#----------------------------------------------------------------------------
