"""Nothing a user does loses or mixes their training work: one run per directory, warm starts that survive a
kill, --ratio-ema checkpoints, the warm-start weights evaluate.py scores, resumes that are exact or refused,
inputs refused in one line, a full disk, and one copy of a resumed checkpoint per machine."""

import errno
import json
import os
import re
import signal
import struct
import subprocess
import sys
import time
import zlib

import pytest
import torch

import dataset
import edm_nets
import fixtures
import flags
import rundir
import train_cifar
import train_edm
import training_loop
from fixtures import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('noloss')
    torch.manual_seed(0)
    fixtures.write_edm_pickle(d / 'teacher.pkl', dict(ema=fixtures.tiny_songunet().eval()))
    torch.manual_seed(1)
    fixtures.write_edm_pickle(d / 'other_teacher.pkl', dict(ema=fixtures.tiny_songunet().eval()))     # same architecture, other weights
    fixtures.write_dataset_zip(d / 'data.zip', num=32, resolution=8, num_classes=4)
    return d

def common(files, outdir):
    return ['--teacher', str(files / 'teacher.pkl'), '--data', str(files / 'data.zip'), '--outdir', str(outdir), '--batch', '8',
            '--disc-res', '8,4', '--grid', '4', '--log-every', '1', '--snap-every', '100', '--lr', '1e-3', '--ckpt-every', '1', '--keep', '100', '--workers', '0']

def command(files, outdir, *args, nproc=1, script='train_cifar.py'):
    launch = [sys.executable] if nproc == 1 else [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}']
    return launch + [script] + common(files, outdir) + list(args)

ENV = dict(os.environ, OMP_NUM_THREADS='1')

def train(files, outdir, *args, nproc=1, check=True):
    result = subprocess.run(command(files, outdir, *args, nproc=nproc), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f'train_cifar.py failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
    return result

# The same run in this process (faster: no interpreter start-up), through the scripts' own main and user_errors.
def train_here(files, outdir, *args):
    torch.manual_seed(0)
    torch.set_num_threads(1)                        # as the subprocess runs (OMP_NUM_THREADS=1): the shared CI cores are not oversubscribed
    train_edm.main('test', train_cifar.PRESET, common(files, outdir) + list(args))

def one_line_error(call):
    with pytest.raises(SystemExit) as exit:
        call()
    assert exit.value.code == 2 and '\n' not in str(exit.value)
    return str(exit.value)

def start(cmd):                                     # its own process group: kill -9 reaches torchrun's workers too
    return subprocess.Popen(cmd, cwd=ROOT, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)

def wait_for(condition, procs, timeout=300):
    deadline = time.time() + timeout
    while not condition() and time.time() < deadline:
        time.sleep(0.05)
    assert condition(), [p.stderr.read() for p in procs if p.poll() is not None]

def kill9(proc):
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()

def load(path):
    return torch.load(path, map_location='cpu', weights_only=True)

def assert_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k

#----------------------------------------------------------------------------
# One run per directory: claimed before anything is written; a claim dies with its process.

def test_two_runs_started_at_once_into_one_outdir_one_refuses_and_kill9_leaves_no_stale_claim(files, tmp_path):
    out = tmp_path / 'run'
    long = ['--iterations', '1000', '--ckpt-every', '2']
    procs = {1: start(command(files, out, *long)), 2: start(command(files, out, *long, nproc=2))}    # a process and a torchrun, at once
    try:
        wait_for(lambda: any(p.poll() is not None for p in procs.values()), procs.values())
        refused = next(n for n, p in procs.items() if p.poll() is not None)
        survivor = 3 - refused
        err = procs[refused].stderr.read().strip()
        assert procs[refused].returncode != 0
        lines = [line for line in err.splitlines() if 'error:' in line]
        assert len(lines) == 1 and f'{out} is in use by another run' in lines[0] and 'holds' in lines[0], err
        assert not re.search(rf'File "{re.escape(ROOT)}/\w+\.py"', err), err     # no traceback from our code (torchrun's launcher prints its own)
        wait_for(lambda: (out / 'checkpoint-0000002.pt').exists(), [procs[survivor]])
        assert procs[survivor].poll() is None
    finally:
        for p in procs.values():
            if p.poll() is None:
                kill9(p)
    stats = [json.loads(line)['iteration'] for line in open(out / 'stats.jsonl') if line.endswith('\n')]
    assert stats == list(range(1, len(stats) + 1))             # one run's lines only
    # kill -9 left run.lock behind; the kernel dropped its lock, so --resume claims the folder.
    assert (out / rundir.LOCK_FILE).exists()
    last = int(sorted(out.glob('checkpoint-*.pt'))[-1].stem.split('-')[1])
    train(files, out, '--iterations', str(last + 2), '--ckpt-every', '2', '--resume', nproc=survivor)
    assert [json.loads(line)['iteration'] for line in open(out / 'stats.jsonl')] == list(range(1, last + 3))

#----------------------------------------------------------------------------
# Warm starts: the weights evaluate.py scores (the EMA), and the same start again after a kill before the first checkpoint.

@pytest.fixture(scope='module')
def source(files, tmp_path_factory):
    out = tmp_path_factory.mktemp('source')
    # One generator step; EMA ramp-up off, half-life 10 images at batch 8: beta = 0.5 ** 0.8, so the EMA differs from the generator.
    train_here(files, out, '--iterations', '1', '--ema-halflife-kimg', '0.01', '--ema-rampup', '0')
    return out

def test_warm_start_takes_the_ema_of_a_snapshot_or_the_raw_weights_on_request(files, source, tmp_path):
    snap = load(source / 'snapshot-0000001.pt')
    assert any(not torch.equal(snap['generator'][k], snap['generator_ema'][k]) for k in snap['generator'])
    for weights, key in (('ema', 'generator_ema'), ('raw', 'generator')):
        out = tmp_path / weights
        train_here(files, out, '--iterations', '1', '--lr', '0', '--init-from', str(source / 'snapshot-0000001.pt'), '--init-from-weights', weights)
        assert_equal(load(out / 'snapshot-0000000.pt')['generator'], snap[key])
        assert f'generator: its {"EMA" if weights == "ema" else "raw weights"}' in open(out / 'log.txt').read()

def test_warm_start_survives_a_kill_before_the_first_checkpoint(files, source, tmp_path):
    out, init = tmp_path / 'run', ['--init-from', str(source / 'checkpoint-0000001.pt')]
    proc = start(command(files, out, '--iterations', '1000', '--ckpt-every', '1000', *init))
    try:
        wait_for(lambda: (out / 'stats.jsonl').exists(), [proc])
    finally:
        kill9(proc)
    assert not list(out.glob('checkpoint-*'))
    message = one_line_error(lambda: train_here(files, out, '--iterations', '2', '--resume'))      # the warm start forgotten: refused
    assert f'began with --init-from {source / "checkpoint-0000001.pt"} and has no checkpoint yet; pass --init-from' in message
    train_here(files, out, '--iterations', '2', '--resume', *init)
    assert 'starts over from iteration 0' in open(out / 'log.txt').read()
    x = load(source / 'checkpoint-0000001.pt')
    assert_equal(load(out / 'snapshot-0000000.pt')['generator'], x['generator_ema'])
    assert_equal(load(out / 'checkpoint-0000001.pt')['fake_score'], x['fake_score'])    # iteration 0 is a generator step: the critic as loaded

#----------------------------------------------------------------------------
# --ratio-ema: bins not reached yet are saved as "not seen", and a resume is bitwise the straight run.

def test_ratio_ema_checkpoints_and_resumes_bitwise(files, tmp_path):
    flags_ = ['--ratio-ema', '0.5', '--num-bins', '10', '--ema-halflife-kimg', '0.01']
    train_here(files, tmp_path / 'straight', '--iterations', '7', *flags_)
    first = load(tmp_path / 'straight' / 'checkpoint-0000001.pt')
    # Iteration 0 is the only generator step before it: 8 sigmas reach at most 8 of the 10 bins.
    seen = first['ratio_seen']
    assert seen.dtype == torch.bool and 0 < int(seen.sum()) <= 8 and torch.isfinite(first['ratio_means']).all()
    assert (first['ratio_means'][~seen] == 0).all() and (first['ratio_means'][seen] > 0).all()
    (tmp_path / 'resumed').mkdir()                                          # from iteration 3: critic steps, then the generator step 5
    (tmp_path / 'resumed' / 'checkpoint-0000003.pt').write_bytes((tmp_path / 'straight' / 'checkpoint-0000003.pt').read_bytes())
    train_here(files, tmp_path / 'resumed', '--iterations', '7', '--resume', *flags_)
    a, b = load(tmp_path / 'straight' / 'checkpoint-0000007.pt'), load(tmp_path / 'resumed' / 'checkpoint-0000007.pt')
    for key in ('generator', 'generator_ema', 'fake_score', 'head'):
        assert_equal(a[key], b[key])
    assert torch.equal(a['ratio_means'], b['ratio_means']) and torch.equal(a['ratio_seen'], b['ratio_seen'])
    assert int(a['ratio_seen'].sum()) > int(seen.sum())         # the second generator step reached more bins
    rundir.load_checkpoint(str(tmp_path / 'resumed' / 'checkpoint-0000003.pt'))     # memory-mapped and trained on, the file is unchanged

#----------------------------------------------------------------------------
# Resumes that could not be exact, and checkpoints that do not fit, are refused in one line before training.

def test_inexact_resumes_and_foreign_checkpoints_are_refused(files, source, tmp_path):
    ckpt = source / 'checkpoint-0000001.pt'
    out = tmp_path / 'run'
    out.mkdir()
    (out / 'checkpoint-0000001.pt').write_bytes(ckpt.read_bytes())
    resume = ['--iterations', '3', '--resume', '--ema-halflife-kimg', '0.01', '--ema-rampup', '0']
    message = one_line_error(lambda: train_here(files, out, *resume, '--batch-gpu', '4'))
    assert 'was trained on 1 processes x --batch-gpu 8, this run is 1 x 4: run it on 1 processes with --batch-gpu 8' in message
    copied = tmp_path / 'teacher-copy.pkl'
    copied.write_bytes((files / 'teacher.pkl').read_bytes())
    args = lambda teacher: flags.parse_args('test', train_cifar.PRESET, train_edm.add_edm_args, common(files, out)[2:] + ['--teacher', str(teacher)] + resume)
    opts = args(copied)                                             # the same bytes elsewhere: the same teacher
    opts.teacher_sha256 = rundir.teacher_digest(opts)
    assert rundir.start_state(opts, rundir.Run(str(out), 0), (1, 8)).kind == 'resume'
    message = one_line_error(lambda: train_here(files, out, *resume, '--teacher', str(files / 'other_teacher.pkl')))
    assert f'trained with --teacher {files / "teacher.pkl"} (SHA-256' in message and f'and --teacher {files / "other_teacher.pkl"} holds other bytes' in message
    message = one_line_error(lambda: train_here(files, out, *resume[:2], '--resume', str(source / 'snapshot-0000001.pt')))
    assert 'snapshot-0000001.pt is a snapshot (the generator only' in message and '--init-from it in a new --outdir' in message
    # Another architecture: a snapshot of a generator with twice the channels.
    torch.manual_seed(0)
    wide = edm_nets.make_generator(edm_nets.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=32,
                                                       channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9))
    rundir.save_checkpoint(str(tmp_path / 'wide.pt'), dict(iteration=5, options={}, generator=wide.net.state_dict(), generator_ema=None))
    message = one_line_error(lambda: train_here(files, tmp_path / 'new', '--iterations', '1', '--init-from', str(tmp_path / 'wide.pt')))
    assert f'{tmp_path / "wide.pt"} holds another architecture or resolution than this run (its generator: ' in message and 'has shape [' in message
    assert not (tmp_path / 'new' / 'stats.jsonl').exists()

BAD_OUTDIRS = ['too_long', 'a_file']

@pytest.mark.parametrize('case', BAD_OUTDIRS)
def test_an_outdir_that_cannot_be_written_is_one_line(files, tmp_path, case):
    (tmp_path / 'file').write_text('mine')
    outdir = dict(too_long=tmp_path / ('x' * 300), a_file=tmp_path / 'file')[case]
    message = one_line_error(lambda: train_here(files, outdir, '--iterations', '1'))
    assert f'--outdir {outdir}: cannot write there (' in message and 'pass a writable folder' in message
    assert (tmp_path / 'file').read_text() == 'mine'

@pytest.mark.skipif(os.geteuid() == 0, reason='root writes into read-only folders')
def test_a_read_only_outdir_is_one_line(files, tmp_path):
    (tmp_path / 'ro').mkdir(mode=0o555)
    message = one_line_error(lambda: train_here(files, tmp_path / 'ro' / 'run', '--iterations', '1'))
    assert 'cannot write there (Permission denied)' in message

def test_a_full_disk_during_a_checkpoint_is_one_line_and_leaves_no_partial_file(files, tmp_path, monkeypatch):
    # ENOSPC simulated in the writer: the third torch.save (snapshot 0, checkpoint 1, then checkpoint 2) writes
    # half a megabyte, then the disk is full.
    calls, save = [], torch.save
    def full_disk(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            f.write(bytes(2 ** 19))
            raise OSError(errno.ENOSPC, 'No space left on device')
        return save(obj, f, *args, **kwargs)
    monkeypatch.setattr(torch, 'save', full_disk)
    message = one_line_error(lambda: train_here(files, tmp_path, '--iterations', '3'))
    assert message.endswith(f'Cannot write {tmp_path / "checkpoint-0000002.pt"}: the disk is full in {tmp_path}; '
                            'the earlier checkpoints there are intact: free space, then --resume')
    assert not list(tmp_path.glob('*.tmp*'))
    rundir.load_checkpoint(str(tmp_path / 'checkpoint-0000001.pt'))      # intact, checksum verified
    monkeypatch.setattr(torch, 'save', save)
    train_here(files, tmp_path, '--iterations', '3', '--resume')
    assert f'Resumed from {tmp_path / "checkpoint-0000001.pt"}' in open(tmp_path / 'log.txt').read()

#----------------------------------------------------------------------------
# Datasets: labels that are not class indices, and an image header claiming gigapixels.

@pytest.mark.parametrize('label', [-1, 1.5, 'cat', True])
def test_labels_that_are_not_class_indices_are_one_line(tmp_path, label):
    import zipfile
    path = fixtures.write_dataset_zip(tmp_path / 'data.zip', num=4, resolution=8)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    labels = json.loads(members['dataset.json'])
    labels['labels'][2][1] = label
    with zipfile.ZipFile(path, 'w') as z:
        for name, data in members.items():
            z.writestr(name, json.dumps(labels) if name == 'dataset.json' else data)
    def read():
        with flags.user_errors('train_cifar.py'):
            dataset.ImageDataset(str(path))
    message = one_line_error(read)
    assert f'dataset.json labels 00000/img00000002.png with {label!r}; labels are class indices' in message

def png_claiming(width, height):
    ihdr = struct.pack('>IIBBBBB', width, height, 8, 2, 0, 0, 0)
    chunk = lambda kind, data: struct.pack('>I', len(data)) + kind + data + struct.pack('>I', zlib.crc32(kind + data))
    return b'\x89PNG\r\n\x1a\n' + chunk(b'IHDR', ihdr) + chunk(b'IDAT', zlib.compress(b'\0' * 16)) + chunk(b'IEND', b'')

def test_an_image_header_claiming_a_huge_size_is_one_line(tmp_path):
    import zipfile
    path = fixtures.write_dataset_zip(tmp_path / 'data.zip', num=4, resolution=8)
    with zipfile.ZipFile(path) as z:
        members = {n: z.read(n) for n in z.namelist()}
    for name, (w, h), expect in (('first', (100000, 100000), 'its header claims more than'), ('later', (5000, 5000), 'claims 5000x5000 pixels, the dataset\'s images are 8x8')):
        target = '00000/img00000000.png' if name == 'first' else '00000/img00000003.png'
        with zipfile.ZipFile(tmp_path / f'{name}.zip', 'w') as z:
            for member, data in members.items():
                z.writestr(member, png_claiming(w, h) if member == target else data)
        def read():
            with flags.user_errors('train_cifar.py'):
                images = dataset.ImageDataset(str(tmp_path / f'{name}.zip'))
                train_edm.verify_images(images, 0, 1)
        message = one_line_error(read)
        assert f'{target}' in message and expect in message and 'replace or remove that image' in message

#----------------------------------------------------------------------------
# One copy of a resumed checkpoint per machine: every rank memory-maps it, the page cache is shared.

def test_resume_on_two_ranks_holds_one_copy_of_the_checkpoint(tmp_path):
    # A teacher with 64 channels: its checkpoint (~7 networks' worth with the Adam moments) dwarfs the allocator's noise.
    torch.manual_seed(0)
    teacher = edm_nets.EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=64,
                                  channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4], augment_dim=9)
    fixtures.write_edm_pickle(tmp_path / 'teacher.pkl', dict(ema=teacher.eval()))
    fixtures.write_dataset_zip(tmp_path / 'data.zip', num=16, resolution=8, num_classes=4)
    out = tmp_path / 'run'
    args = ['--teacher', str(tmp_path / 'teacher.pkl'), '--data', str(tmp_path / 'data.zip'), '--outdir', str(out), '--batch', '4',
            '--disc-res', '8', '--grid', '2', '--snap-every', '100', '--workers', '0', '--ema-halflife-kimg', '0.01']
    torchrun = [sys.executable, '-m', 'torch.distributed.run', '--nproc_per_node=2']
    subprocess.run(torchrun + [f'--master_port={free_port()}', 'train_cifar.py', *args, '--iterations', '1'], cwd=ROOT, env=ENV, check=True, capture_output=True)
    size = os.path.getsize(out / 'checkpoint-0000001.pt')
    assert size > 40 * 2 ** 20
    result = subprocess.run(torchrun + [f'--master_port={free_port()}', 'tests/resume_memory_worker.py', *args, '--iterations', '2', '--resume'],
                            cwd=ROOT, env=ENV, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    growth = [json.load(open(out / f'memory-{rank}.json')) for rank in (0, 1)]
    # Reading the checkpoint into private memory on each rank would grow both ranks by ~size (2 x size in all);
    # mapped, its pages are the page cache's, one copy per machine. 1/4 of size leaves room for the allocator.
    total = sum(g['load'] + g['restore'] for g in growth)
    assert total < size / 4, (growth, size)
