"""A run is a folder: its log, stats.jsonl, sample grids, atomic checksummed checkpoints, and where a run starts.

training_loop.py writes through Run; evaluate.py reads checkpoints through load_checkpoint(). Checks that a
--resume or --init-from is possible (the recipe unchanged, a checkpoint intact) run before any network is built.
"""

import errno
import fcntl
import glob
import hashlib
import json
import os
import re
import zlib
from typing import NamedTuple, Optional

import numpy as np
import PIL.Image
import torch

#----------------------------------------------------------------------------
# One run per directory. The run claims --outdir before it writes anything: an exclusive POSIX lock (fcntl.lockf)
# on <outdir>/run.lock, held for the life of the process. The kernel drops it when the process ends, kill -9
# included, so a stale claim never blocks --resume, and no pid is read back that could have been reused (an O_EXCL
# file would need both). Not flock: its lock is shared with forked children, and DataLoader workers outlive a
# killed run by seconds. The lock file stays: deleting it would let a third run lock a new file while the second
# holds the old one.

LOCK_FILE = 'run.lock'
_claims = {}                                    # outdir -> open lock file of this process

def claim(outdir):
    path = os.path.join(outdir, LOCK_FILE)
    if os.path.realpath(outdir) in _claims:
        return
    try:
        os.makedirs(outdir, exist_ok=True)
        f = open(path, 'a+')
    except OSError as err:                      # a read-only folder, an existing file, a name too long, ...
        raise ValueError(f'--outdir {outdir}: cannot write there ({err.strerror}); pass a writable folder with a shorter path') from None
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno not in (errno.EACCES, errno.EAGAIN):
            raise
        f.seek(0)
        holder = f.read().strip()
        f.close()
        raise FileExistsError(f'{outdir} is in use by another run ({holder or "a running process"} holds {path}); wait for it to end, or pass another --outdir') from None
    f.truncate(0)
    f.write(f'pid {os.getpid()} on {os.uname().nodename}\n')
    f.flush()
    _claims[os.path.realpath(outdir)] = f

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
    # A full disk (or any failed write) ends in one line naming the folder; atomic_write removes the partial file,
    # earlier files stay.
    def save_checkpoint(self, state, keep, prefix='checkpoint'):
        bad = non_finite(state)
        if bad is not None:
            raise FloatingPointError(f'{bad} is not finite at iteration {state["iteration"]}')
        if self.rank != 0:
            return
        path = os.path.join(self.outdir, f'{prefix}-{state["iteration"]:07d}.pt')
        try:
            write_checkpoint(path, state)                   # checked above
        except OSError as err:
            why = 'the disk is full' if err.errno in (errno.ENOSPC, errno.EDQUOT) else err.strerror or type(err).__name__
            raise OSError(f'Cannot write {path}: {why} in {os.path.abspath(self.outdir)}; the earlier checkpoints there are intact: free space, then --resume') from None
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
    try:
        with open(tmp, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:                       # a full disk, an error or an interrupt: no partial file is left
        if os.path.exists(tmp):
            os.remove(tmp)
        raise

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
    write_checkpoint(path, state)

def write_checkpoint(path, state):
    state = dict(state, checksum=state_checksum(state))
    atomic_write(path, lambda f: torch.save(state, f))

# mmap=True maps the file instead of reading it: processes on one machine share its pages (the page cache),
# so a resume on 8 ranks holds one copy of the checkpoint in host memory, not eight. The mapping is private:
# in-place updates of loaded tensors (Adam's moments on a CPU) copy their pages and never reach the file.
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
# Where a run starts, checked before any network is built: Start(checkpoint, its state, 'resume' or 'init'), or
# Start(None, None, None). Nothing in --outdir is overwritten by a new run. `split` is (processes, --batch-gpu)
# of this run. Checkpoints are memory-mapped (load_checkpoint).

class Start(NamedTuple):
    path:   Optional[str]                   # The checkpoint or snapshot read, if any.
    state:  Optional[dict]                  # What it holds.
    kind:   Optional[str]                   # 'resume' (exactly), 'init' (--init-from: networks only), None.

def start_state(opts, run, split):
    if opts.benchmark:
        return Start(None, None, None)
    if run.holds_run() and not opts.resume:
        raise FileExistsError(f'{opts.outdir} already holds a run: pass --resume to continue it, or a new --outdir')
    if opts.resume:
        path, state = resume_checkpoint(opts, run, split)
        if state is not None:
            return Start(path, state, 'resume')
        started_as(opts, run)               # killed before its first checkpoint: it starts over as it began
    if opts.init_from:
        return Start(opts.init_from, load_checkpoint(opts.init_from, mmap=True), 'init')
    return Start(None, None, None)

# Exact resume needs the recipe the checkpoint was trained with.
RECIPE = ('f', 'seed', 'batch', 'tau', 'w_gan', 'lr', 'lr_head', 'lr2', 'lr2_at', 'wd', 'r1_gamma', 'r1_approx', 'r_min', 'r_max', 'num_bins',
          'ratio_ema', 'disc_res', 'ema_halflife_kimg', 'ema_rampup', 'grad_clip', 'precision', 'sigma_init', 'reg_weight', 'cfg', 'resolution')

# The checkpoint --resume continues from: a named file must be intact; the latest in --outdir that is intact,
# each damaged newer one reported in the log; (None, None) for a run killed before its first checkpoint.
def resume_checkpoint(opts, run, split):
    if opts.resume != 'latest':
        path, state = opts.resume, load_checkpoint(opts.resume, mmap=True)
    else:
        found = run.checkpoints()
        if not found and not run.holds_run():
            raise FileNotFoundError(f'--resume: no run in {opts.outdir} (no checkpoint-*.pt, no stats.jsonl); check --outdir')
        path = state = None
        for candidate in reversed(found):
            try:
                path, state = candidate, load_checkpoint(candidate, mmap=True)
                break
            except ValueError as err:
                run.log(f'Cannot resume from {candidate}: {err}; trying the one before')
        if found and state is None:
            raise ValueError(f'--resume: none of the {len(found)} checkpoints in {opts.outdir} is intact; pass --resume FILE or start a new --outdir')
    if state is None:
        return None, None
    if 'opt_g' not in state:
        raise ValueError(f'--resume {path} is a snapshot (the generator only, no critic or optimiser state): pass a checkpoint-*.pt, or --init-from it in a new --outdir')
    check_same_run(opts, path, state, split)
    if state['iteration'] >= opts.iterations:
        raise ValueError(f'--resume: {path} is at iteration {state["iteration"]}, and --iterations is {opts.iterations}: pass a larger --iterations to train on')
    return path, state

# What makes a resume inexact is refused with the flags that make it exact: the recipe; the split of each step
# over processes and accumulation rounds (the stage-1/2 normalisations are per round, and the gradients are
# summed in another order); the teacher's bytes (its SHA-256: a copied teacher keeps it, a retrained one with
# the same name and size does not).
def check_same_run(opts, path, state, split):
    fix = 'to continue it exactly, or --init-from it in a new --outdir'
    changed = [k for k in RECIPE if k in state['options'] and getattr(opts, k, None) != state['options'][k]]
    if changed:
        flags = ' '.join(f'--{k.replace("_", "-")} {state["options"][k] if not isinstance(state["options"][k], list) else ",".join(map(str, state["options"][k]))}' for k in changed)
        raise ValueError(f'--resume: {path} was trained with {flags}; pass the same flags {fix}')
    if state.get('world_size') is not None and (state['world_size'], state['batch_gpu']) != tuple(split):
        raise ValueError(f'--resume: {path} was trained on {state["world_size"]} processes x --batch-gpu {state["batch_gpu"]}, this run is '
                         f'{split[0]} x {split[1]}: run it on {state["world_size"]} processes with --batch-gpu {state["batch_gpu"]} {fix}')
    old, new = state['options'].get('teacher_sha256'), getattr(opts, 'teacher_sha256', None)
    if None not in (old, new) and old != new:       # None: no teacher file (the task reports it), or a run before digests
        flag = next(k for k in TEACHER_FLAGS if state['options'].get(k))
        raise ValueError(f'--resume: {path} was trained with --{flag} {state["options"][flag]} (SHA-256 {old[:12]}...), and --{flag} '
                         f'{getattr(opts, flag)} holds other bytes: pass the teacher it was trained with {fix}')

# A resume of a warm start killed before its first checkpoint starts over from the same --init-from.
def started_as(opts, run):
    path = os.path.join(opts.outdir, 'training_options.json')
    try:
        started = json.load(open(path))
    except (OSError, ValueError):
        return                              # killed before it wrote its options: nothing to match
    for key in ('init_from', 'init_from_weights'):
        if key in started and started[key] != getattr(opts, key, None):
            flag = f'--{key.replace("_", "-")}'
            fix = f'pass {flag} {started[key]}' if started[key] else f'drop {flag}'
            raise ValueError(f'--resume: the run in {opts.outdir} began with {flag} {started[key]} and has no checkpoint yet; {fix} to start it over as it began')

# The teacher's identity: SHA-256 of its file (EDM pickle) or of every file in its folder (SD), path names included.
TEACHER_FLAGS = ('teacher', 'sd')

def teacher_digest(opts):
    root = next((getattr(opts, k) for k in TEACHER_FLAGS if getattr(opts, k, None)), None)
    if root is None or not os.path.exists(root):
        return None                         # the task reports a missing teacher
    files = [root] if os.path.isfile(root) else sorted(os.path.join(d, f) for d, _, names in os.walk(root) for f in names)
    digest = hashlib.sha256()
    for name in files:
        digest.update(os.path.relpath(name, root).encode())
        with open(name, 'rb') as f:
            digest.update(hashlib.file_digest(f, 'sha256').digest())
    return digest.hexdigest()
