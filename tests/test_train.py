"""train_cifar.py / train_imagenet.py end to end on CPU: a tiny random teacher in the official pickle
format, a synthetic dataset zip, torchrun with gloo."""

import json
import math
import os
import re
import struct
import subprocess
import sys
import time
import zipfile

import pytest
import torch

import edm_nets
import edm_pickle
import fixtures
from fixtures import free_port, load_checkpoint as load

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('train')
    torch.manual_seed(0)
    fixtures.write_edm_pickle(d / 'teacher.pkl', dict(ema=fixtures.tiny_songunet().eval()))
    fixtures.write_dataset_zip(d / 'data.zip', num=32, resolution=8, num_classes=4)
    fixtures.write_dataset_zip(d / 'data16.zip', num=8, resolution=16, num_classes=4)
    return d

def train(files, outdir, *args, nproc=1, check=True, script='train_cifar.py'):
    common = ['--teacher', str(files / 'teacher.pkl'), '--data', str(files / 'data.zip'), '--outdir', str(outdir),
              '--batch', '8', '--disc-res', '8,4', '--grid', '4', '--log-every', '1', '--snap-every', '100',
              '--lr', '1e-3', '--ckpt-every', '1', '--keep', '100']
    if nproc == 1:
        cmd = [sys.executable, script]
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}', script]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(cmd + common + list(args), cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
    return result

def assert_same(a, b, atol):
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m: f'{k}: {m}')

def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)

# One straight single-process run of 7 iterations (forward-KL, tau 5), checkpointed every iteration.
@pytest.fixture(scope='module')
def straight(files, tmp_path_factory):
    out = tmp_path_factory.mktemp('straight')
    train(files, out, '--iterations', '7', '--ema-halflife-kimg', '0.01')
    return out

# Equivalence of process counts and accumulation rounds is a statement about gradients: Adam moves every weight by
# about lr whatever the size of its gradient, so a float32 rounding difference in a near-zero gradient flips its
# sign and moves that weight by 2 lr. With --lr 0 no weight moves, every gradient is taken at the teacher's
# weights, and the checkpoint's Adam moments (exp_avg = sum of 0.1 * 0.9^k * g, exp_avg_sq likewise of g^2) are
# fixed sums of the gradients of all steps so far.
def adam_moments(ckpt):
    return {f'{opt}/{i}/{name}': value for opt in ('opt_g', 'opt_c') for i, state in ckpt[opt]['state'].items()
            for name, value in state.items() if name != 'step'}

# Each gradient element is a float32 reduction over the batch and the pixels (<= ~10^4 terms), summed in another
# order when split over processes or rounds: its error is ~sqrt(n) * 6e-8 of the largest terms, well below
# 1e-4 of the largest element of its tensor; a wrong reduction (a missing rank, a mean over the wrong batch) is O(1).
def assert_same_gradients(a, b):
    a, b = adam_moments(a), adam_moments(b)
    assert a.keys() == b.keys() and len(a) > 10
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-4 * a[k].abs().max().item(), rtol=0, msg=lambda m: f'{k}: {m}')

@pytest.fixture(scope='module')
def frozen(files, tmp_path_factory):
    out = tmp_path_factory.mktemp('frozen')
    train(files, out, '--iterations', '3', '--lr', '0')
    return out

# The same with reverse-KL (h = 1: no weight normalisation, so accumulation rounds give the same gradients), grid of 8.
@pytest.fixture(scope='module')
def frozen_rkl(files, tmp_path_factory):
    out = tmp_path_factory.mktemp('frozen_rkl')
    train(files, out, '--iterations', '3', '--f', 'rkl', '--lr', '0', '--grid', '8')
    return out

#----------------------------------------------------------------------------

def test_torchrun_two_processes_end_to_end_and_equal_to_one_process(files, frozen, tmp_path):
    out = tmp_path / 'run'
    result = train(files, out, '--iterations', '3', '--lr', '0', '--ema-halflife-kimg', '0.01', nproc=2)
    assert 'f-distill with forward-KL' in result.stdout
    assert {'training_options.json', 'stats.jsonl', 'log.txt', 'grid-0000000.png', 'grid-0000003.png', 'checkpoint-0000003.pt'} <= set(os.listdir(out))
    stats = [json.loads(line) for line in open(out / 'stats.jsonl')]
    assert [s['iteration'] for s in stats] == list(range(1, 4))
    for s in stats:
        for k, v in s.items():
            assert v == v and abs(v) != float('inf'), f'{k} not finite at iteration {s["iteration"]}'
    assert 'loss_fdistill' in stats[0] and 'loss_dsm' in stats[1]      # Alg. 1: it 0 generator, it 1 critic
    assert 0 < stats[0]['h_ess'] <= 1 and abs(stats[0]['h_mean'] - 1) < 1e-5
    options = json.load(open(out / 'training_options.json'))
    assert options['world_size'] == 2 and options['batch_gpu'] == 4
    a, b = load(frozen, 3), load(out, 3)
    assert b['iteration'] == 3 and b['options']['f'] == 'fkl' and b['generator_kwargs']['model_type'] == 'SongUNet'
    # Same global batch on 1 and 2 processes (f-distill's weights normalised over both): same gradients.
    assert_same_gradients(a, b)
    # Per-sigma-bin diagnostics are all-reduced: the 2-process log equals the 1-process one (iteration 0 is a
    # generator step, h_bar spread; iteration 1 a critic step, accuracy, from the same initial head).
    one = [json.loads(line) for line in open(frozen / 'stats.jsonl')]
    bins = lambda s, prefix: {k: v for k, v in s.items() if k.startswith(prefix)}
    assert bins(stats[0], 'h_std_bin') == pytest.approx(bins(one[0], 'h_std_bin'), rel=1e-4, abs=1e-6) and bins(one[0], 'h_std_bin')
    assert bins(stats[1], 'disc_acc') == pytest.approx(bins(one[1], 'disc_acc'), abs=1e-9) and len(bins(one[1], 'disc_acc_bin')) > 1

def test_lr_head_sets_the_head_step_and_follows_lr2(files, tmp_path):
    # AdamW's first step moves every parameter with a nonzero gradient by lr (m / sqrt(v) = +-1) plus lr * wd * p,
    # so the largest change in the first critic step (iteration 1) is the head's lr, and the fake score's.
    train(files, tmp_path, '--iterations', '3', '--lr', '1e-3', '--lr-head', '1e-2', '--lr2', '1e-4', '--lr2-at', '2')
    a, b = load(tmp_path, 1), load(tmp_path, 2)
    step = lambda key: max((a[key][k] - b[key][k]).abs().max().item() for k in a[key])
    assert step('head') == pytest.approx(1e-2, rel=0.03) and step('fake_score') == pytest.approx(1e-3, rel=0.03)
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert [v for s in stats for v in (s['lr'], s['lr_head'])] == pytest.approx([1e-3, 1e-2, 1e-3, 1e-2, 1e-4, 1e-3])  # --lr2 keeps the ratio

# A kill leaves damage behind: zero 4 KB of one tensor's bytes in the middle of a checkpoint.
def zero_tensor_bytes(path, n=4096):
    with zipfile.ZipFile(path) as z:
        info = max((i for i in z.infolist() if '/data/' in i.filename), key=lambda i: i.file_size)     # a tensor's storage
    with open(path, 'r+b') as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = struct.unpack('<HH', f.read(4))
        f.seek(info.header_offset + 30 + name_len + extra_len + (info.file_size - n) // 2)
        f.write(bytes(n))

def test_resume_equals_straight_run_past_damaged_checkpoints(files, straight, tmp_path):
    import flags, rundir, train_cifar, train_edm, training_loop
    train(files, tmp_path, '--iterations', '4', '--ema-halflife-kimg', '0.01')
    ckpt = lambda it: tmp_path / f'checkpoint-{it:07d}.pt'
    zero_tensor_bytes(ckpt(4))                              # silent corruption: only the checksum sees it
    ckpt(3).write_bytes(ckpt(3).read_bytes()[:ckpt(3).stat().st_size // 2])        # truncated
    (tmp_path / 'checkpoint-0000005.pt.tmp4242').write_bytes(b'partial')         # a write cut short by a kill
    with open(tmp_path / 'stats.jsonl', 'a') as f:
        f.write('{"iteration": 5, "kimg": 0.')                                    # a stats line cut short
    opts = lambda *args: flags.parse_args('test', train_cifar.PRESET, train_edm.add_edm_args,
        ['--outdir', str(tmp_path), '--batch', '8', '--disc-res', '8,4', '--lr', '1e-3', '--ema-halflife-kimg', '0.01', *args])
    run = rundir.Run(str(tmp_path), 0)
    with pytest.raises(ValueError, match='fails its checksum'):            # named explicitly: refused
        rundir.start_state(opts('--iterations', '7', '--resume', str(ckpt(4))), run, (1, 8))
    with pytest.raises(ValueError, match=r'trained with --f fkl --seed 0; pass the same flags'):
        rundir.start_state(opts('--iterations', '7', '--resume', '--f', 'rkl', '--seed', '1'), run, (1, 8))
    with pytest.raises(ValueError, match=r'is at iteration 2, and --iterations is 2: pass a larger --iterations'):
        rundir.start_state(opts('--iterations', '2', '--resume'), run, (1, 8))
    train(files, tmp_path, '--iterations', '7', '--ema-halflife-kimg', '0.01', '--resume')
    a, b = load(straight, 7), load(tmp_path, 7)
    for key in ('generator', 'generator_ema', 'fake_score', 'head'):
        assert_same(a[key], b[key], atol=0)                 # same machine, same process count: bitwise
    log = open(tmp_path / 'log.txt').read()
    assert f'Cannot resume from {ckpt(4)}: Checkpoint {ckpt(4)} fails its checksum' in log
    assert f'Cannot resume from {ckpt(3)}: Checkpoint {ckpt(3)} is truncated or corrupt' in log
    assert f'Resumed from {ckpt(2)} at iteration 2' in log
    assert not (tmp_path / 'checkpoint-0000005.pt.tmp4242').exists()
    assert [json.loads(line)['iteration'] for line in open(tmp_path / 'stats.jsonl')] == list(range(1, 8))

def test_schedule_follows_algorithm1(files, straight):
    # tau = 5: iterations 0 and 5 update only the generator; 1-4 and 6 only the fake score and the head.
    teacher = edm_pickle.load_edm_pickle(str(files / 'teacher.pkl'))['ema'].state_dict()
    ckpt = {i: load(straight, i) for i in range(1, 8)}
    assert changed(teacher, ckpt[1]['generator']) and not changed(teacher, ckpt[1]['fake_score'])
    for it in range(1, 7):
        generator_step = it % 5 == 0
        assert changed(ckpt[it]['generator'], ckpt[it + 1]['generator']) == generator_step
        assert changed(ckpt[it]['fake_score'], ckpt[it + 1]['fake_score']) != generator_step
        assert changed(ckpt[it]['head'], ckpt[it + 1]['head']) != generator_step

def test_ema_follows_generator_steps(files, straight):
    # EMA with half-life 0.01 kimg at batch 8 and EDM's ramp-up 0.05, updated on generator steps only (iterations 0
    # and 5): the first sees 0 images, half-life 0 and beta = 0 (a copy of the generator); the second sees 8 images,
    # half-life min(10, 0.05 * 8) = 0.4 images, beta = 0.5 ** (8 / 0.4).
    ckpt = {i: load(straight, i) for i in (1, 5, 6)}
    assert_same(ckpt[1]['generator'], ckpt[1]['generator_ema'], atol=0)
    assert_same(ckpt[1]['generator_ema'], ckpt[5]['generator_ema'], atol=0)
    beta = 0.5 ** (8 / 0.4)
    expect6 = {k: beta * ckpt[5]['generator_ema'][k] + (1 - beta) * ckpt[6]['generator'][k] for k in ckpt[6]['generator']}
    assert_same(expect6, ckpt[6]['generator_ema'], atol=1e-6)

def test_ema_beta_ramps_up_to_the_half_life():
    import training_loop
    # EDM: half-life = min(halflife_kimg * 1000, rampup * images seen), beta = 0.5 ** (batch / half-life). Past
    # halflife / rampup images seen, a long run averages over the preset's half-life: beta ** (halflife / batch) = 1/2.
    batch, halflife_kimg, rampup = 2048, 500, 0.05
    for nimg in (10 ** 7, halflife_kimg * 1000 / rampup, 10 ** 9):
        beta = training_loop.ema_beta(batch, nimg, halflife_kimg, rampup)
        assert beta ** (halflife_kimg * 1000 / batch) == pytest.approx(0.5, rel=1e-12)
    # Before that the half-life is 5% of the images seen: over the last 5% of a run the EMA halves its weight,
    # so a short run's EMA stays near the generator instead of near its start.
    for steps in (1, 10, 1000):
        beta = training_loop.ema_beta(batch, steps * batch, halflife_kimg, rampup)
        assert beta ** (rampup * steps) == pytest.approx(0.5, rel=1e-12)
    assert training_loop.ema_beta(batch, 0, halflife_kimg, rampup) == 0                  # the first step copies
    assert training_loop.ema_beta(batch, 0, halflife_kimg, 0) == 0.5 ** (batch / 5e5)      # ramp-up off

def test_warm_start_loads_networks_not_iteration(files, straight, tmp_path):
    train(files, tmp_path, '--iterations', '2', '--lr', '0', '--init-from', str(straight / 'checkpoint-0000007.pt'))
    a, b = load(straight, 7), load(tmp_path, 2)
    for key in ('fake_score', 'head'):
        assert_same(a[key], b[key], atol=0)
    assert_same(a['generator_ema'], b['generator'], atol=0)        # the EMA, as evaluate.py scores (--init-from-weights)
    assert b['iteration'] == 2

def in_process_task(files, outdir, *args):
    import flags, rundir, train_cifar, train_edm, training_loop
    opts = flags.parse_args('test', train_cifar.PRESET, train_edm.add_edm_args, [
        '--teacher', str(files / 'teacher.pkl'), '--data', str(files / 'data.zip'), '--outdir', str(outdir),
        '--batch', '8', '--disc-res', '8', '--grid', '4', '--ckpt-every', '1', '--log-every', '1', *args])
    return opts, train_edm.build_task(opts, train_cifar.PRESET, torch.device('cpu'), 0, 1)

def test_non_finite_losses_are_skipped_then_stop_the_run(files, tmp_path):
    import training_loop
    opts, task = in_process_task(files, tmp_path, '--iterations', '10', '--max-nan', '3')
    task.real = lambda indices: torch.full((len(indices), 3, 8, 8), float('nan'))     # every critic loss NaN
    with pytest.raises(FloatingPointError, match=f'3 non-finite losses in a row at iteration 3; stopping. Last good checkpoint: {tmp_path / "checkpoint-0000003.pt"}'):
        training_loop.training_loop(opts, task, 0, 1, torch.device('cpu'))
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert [s['nan_total'] for s in stats] == [0, 1, 2]
    last = load(tmp_path, 3)                            # Skipped steps leave the networks as they were.
    assert_same(load(tmp_path, 1)['fake_score'], last['fake_score'], atol=0)
    assert all(torch.isfinite(v).all() for v in last['generator'].values())

def test_non_finite_weights_are_never_checkpointed(files, tmp_path):
    # A finite loss can still make non-finite weights (here an infinite learning rate past the flag check).
    import training_loop
    opts, task = in_process_task(files, tmp_path, '--iterations', '3')
    opts.lr = float('inf')
    with pytest.raises(FloatingPointError, match=r'generator/.* is not finite at iteration 1; stopping. Last good checkpoint: none yet'):
        training_loop.training_loop(opts, task, 0, 1, torch.device('cpu'))
    assert not list(tmp_path.glob('checkpoint-*'))

def test_disc_res_missing_from_the_teacher_names_the_flag(files, tmp_path):
    with pytest.raises(ValueError, match=r'--disc-res 32: No encoder level at 32x32; this network has levels \[8, 4\]; pass --disc-res with some of those'):
        in_process_task(files, tmp_path, '--disc-res', '32')

def test_lpips_regression_pairs_and_loss(files, tmp_path):
    import torchvision
    vgg = {k: v for k, v in torchvision.models.vgg16().state_dict().items() if k.startswith('features.')}
    torch.save(vgg, tmp_path / 'vgg16.pth')
    train(files, tmp_path / 'run', '--iterations', '1', '--reg-weight', '0.25', '--reg-pairs', '4',
                   '--reg-batch', '2', '--reg-steps', '2', '--lpips-vgg', str(tmp_path / 'vgg16.pth'))
    pairs = torch.load(tmp_path / 'run' / 'reg_pairs_4_2steps.pt', weights_only=True)
    teacher = edm_pickle.load_edm_pickle(str(files / 'teacher.pkl'))['ema']
    z = edm_nets.StackedRandomGenerator('cpu', [3]).randn([1, 3, 8, 8])
    import dataset
    label = dataset.ImageDataset(str(files / 'data.zip')).one_hot([3], 4)
    expect = edm_nets.edm_sampler(teacher, z, label, num_steps=2).float()
    torch.testing.assert_close(pairs[3:4], expect, atol=1e-5, rtol=0)
    stats = json.loads(open(tmp_path / 'run' / 'stats.jsonl').readline())
    assert stats['loss_reg'] > 0
    missing = train(files, tmp_path / 'run2', '--iterations', '1', '--reg-weight', '0.25', check=False)
    assert '--lpips-vgg' in missing.stderr.strip().splitlines()[-1]

def test_gradient_accumulation_rounds_match_one_round_after_kill_before_first_checkpoint(files, frozen_rkl, tmp_path):
    # --batch-gpu 4 with batch 8: two accumulation rounds. Normalisation is per round, so the reverse-KL
    # run (h = 1) must match one round (frozen_rkl); f-distill weights would differ slightly.
    # The accumulating run is first killed (kill -9) after it logged two iterations, before its first checkpoint;
    # --resume then starts it over, and its stats.jsonl holds each iteration once.
    acc = ['--f', 'rkl', '--lr', '0', '--batch-gpu', '4']
    cmd = [sys.executable, 'train_cifar.py', '--teacher', str(files / 'teacher.pkl'), '--data', str(files / 'data.zip'),
           '--outdir', str(tmp_path / 'acc'), '--batch', '8', '--disc-res', '8,4', '--grid', '4', '--log-every', '1',
           '--snap-every', '1000', '--ckpt-every', '1000', '--iterations', '1000', *acc]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS='1'), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    stats = tmp_path / 'acc' / 'stats.jsonl'
    try:
        deadline = time.time() + 300
        while not (stats.exists() and len(stats.read_text().splitlines()) >= 2) and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read()
    finally:
        proc.kill()
        proc.wait()
    assert not list((tmp_path / 'acc').glob('checkpoint-*.pt'))
    again = train(files, tmp_path / 'acc', '--iterations', '3', *acc, check=False)
    assert 'already holds a run' in again.stderr.strip().splitlines()[-1]         # without --resume: refused
    train(files, tmp_path / 'acc', '--iterations', '3', *acc, '--resume')
    assert 'starts over from iteration 0' in open(tmp_path / 'acc' / 'log.txt').read()
    assert [json.loads(line)['iteration'] for line in open(stats)] == [1, 2, 3]
    assert_same_gradients(load(frozen_rkl, 3), load(tmp_path / 'acc', 3))

def read_png(path):
    import numpy as np
    import PIL.Image
    return torch.from_numpy(np.array(PIL.Image.open(path))).int()

# 2 gloo processes x 2 accumulation rounds (no_sync, then the synchronised backward) through tests/train_probe.py,
# which records what setup() built, the gradients at every optimiser step, and the grid's network calls.
def test_ddp_gradients_are_bucket_views_and_rank0_alone_builds_the_grid(files, frozen_rkl, tmp_path):
    train(files, tmp_path, '--iterations', '3', '--f', 'rkl', '--lr', '0', '--batch-gpu', '2', '--grid', '8', '--ema-halflife-kimg', '0.01',
          nproc=2, script='tests/train_probe.py')
    probes = [json.load(open(tmp_path / f'probe-rank{rank}.json')) for rank in (0, 1)]
    for probe in probes:
        # No second copy of the gradients: each is a view into DDP's all-reduce buckets (all of a tiny network's
        # gradients share one 25 MB bucket's storage), and no graph search for unused parameters.
        assert all(ddp == dict(gradient_as_bucket_view=True, find_unused_parameters=False) for ddp in probe['ddp'].values()), probe['ddp']
        assert [step['net'] for step in probe['steps']] == ['generator', 'fake_score', 'head', 'fake_score', 'head']    # tau 5: G, C, C
        for step in probe['steps']:
            assert step['grads'] == step['views'] == step['trainable'] > 1 and step['storages'] == 1, step
    # Same gradients as one process with one round (Adam moments at --lr 0, see adam_moments).
    assert_same_gradients(load(frozen_rkl, 3), load(tmp_path, 3))
    # Rank 0 alone builds the grid, in chunks of --batch-gpu; rank 1 never calls the generator for it.
    assert probes[0]['grid_calls'] == [[it, 2] for it in (0, 3) for _ in range(4)] and probes[1]['grid_calls'] == []
    # The grid is today's: the one-process run's (one chunk of 8). Chunks of 2 sum the convolutions in another
    # order; a float32 difference of a few ulps moves a pixel by at most one level where it rounds at .5, while a
    # wrong latent, label or weight moves most pixels by many levels.
    for it in (0, 3):
        a, b = read_png(frozen_rkl / f'grid-{it:07d}.png'), read_png(tmp_path / f'grid-{it:07d}.png')
        assert a.shape == b.shape == (3 * 8, 3 * 8, 3)                 # 8 images of 8x8 in 3 rows of 3
        assert (a - b).abs().max() <= 1 and (a != b).float().mean() < 0.01

@pytest.mark.parametrize('case', ['unknown_f', 'missing_teacher', 'truncated_teacher', 'missing_data', 'resolution_mismatch'])
def test_bad_input_fails_before_training(files, tmp_path, case):
    truncated = tmp_path / 'truncated.pkl'
    truncated.write_bytes((files / 'teacher.pkl').read_bytes()[:5000])
    args = dict(unknown_f=['--f', 'kl2'], missing_teacher=['--teacher', str(tmp_path / 'nope.pkl')], truncated_teacher=['--teacher', str(truncated)],
                missing_data=['--data', str(tmp_path / 'nope.zip')], resolution_mismatch=['--data', str(files / 'data16.zip')])[case]
    result = train(files, tmp_path / 'run', '--iterations', '2', *args, check=False)
    expect = dict(unknown_f='Unknown divergence "kl2"', missing_teacher='nope.pkl', truncated_teacher='truncated.pkl is not a readable EDM network pickle: truncated or corrupt',
                  missing_data='nope.zip', resolution_mismatch='3x16x16 images; the teacher wants 3x8x8')[case]
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [result.stderr.strip()], result.stderr     # one line, no traceback
    assert result.stderr.startswith('train_cifar.py: error: ') and expect in result.stderr, result.stderr
    assert not os.path.exists(tmp_path / 'run' / 'stats.jsonl')

# Image 5 is truncated: it is in rank 1's share of the up-front image check (ranks take every other image), so rank 1
# finds it, rank 0 prints it once, and every rank exits before training.
def test_torchrun_user_error_is_one_line_and_every_rank_exits(files, tmp_path):
    damaged = tmp_path / 'damaged.zip'
    with zipfile.ZipFile(files / 'data.zip') as src, zipfile.ZipFile(damaged, 'w') as dst:
        for name in src.namelist():
            dst.writestr(name, src.read(name)[:40] if name == '00000/img00000005.png' else src.read(name))
    result = train(files, tmp_path / 'run', '--iterations', '2', '--data', str(damaged), nproc=2, check=False)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if 'error: Dataset' in line]
    assert len(errors) == 1 and errors[0].startswith(f'train_cifar.py: error: Dataset {damaged}: cannot read 00000/img00000005.png'), result.stderr[-2000:]
    # No traceback from our code (torchrun's launcher prints its own, from a venv that may lie inside ROOT).
    assert not re.search(rf'File "{re.escape(ROOT)}/\w+\.py"', result.stderr), result.stderr[-2000:]
    assert not os.path.exists(tmp_path / 'run' / 'stats.jsonl')

def test_plot_draws_the_logged_values(straight, tmp_path):
    import shutil
    import PIL.Image
    import evaluate
    import read_run
    run = tmp_path / 'run'
    os.makedirs(run)
    for name in ('stats.jsonl', 'training_options.json'):
        shutil.copy(straight / name, run / name)
    evaluate.main(['plot', '--ckpt', str(run)])
    assert sorted(os.listdir(run / 'plots')) == ['discriminator.png', 'losses.png', 'speed.png', 'weights.png']   # no FID scored yet
    assert min(PIL.Image.open(run / 'plots' / 'discriminator.png').size) > 300
    # With the FID-per-snapshot file of `evaluate.py fid` (cmd_plot reads RUN/fid-snapshots.json), a fifth figure;
    # every line is the logged numbers.
    fid = dict(snapshots=[dict(iteration=7, path='snapshot-0000007.pt', fid=9.0, num_images=64),
                          dict(iteration=3, path='snapshot-0000003.pt', fid=12.5, num_images=64)],
               best=dict(iteration=7, path='snapshot-0000007.pt', fid=9.0))
    stats = [json.loads(line) for line in open(run / 'stats.jsonl')]
    figures = dict(read_run.run_figures(stats, json.load(open(run / 'training_options.json')), fid))
    assert sorted(figures) == ['discriminator', 'fid', 'losses', 'speed', 'weights']
    def line(name, title_part, label):
        ax = next(ax for ax in figures[name].axes if title_part in ax.get_title())
        return next(l for l in ax.get_lines() if l.get_label() == label)
    for name, title, label, key in [('losses', 'GAN', 'discriminator', 'loss_gan_d'), ('weights', 'effective', 'ESS', 'h_ess'),
                                    ('discriminator', 'accuracy', 'all bins', 'disc_acc'), ('speed', 'images', 'images/s', 'images_per_sec')]:
        x, y = line(name, title, label).get_data()
        assert list(x) == [s['iteration'] for s in stats if key in s], key
        assert list(y) == pytest.approx([s[key] for s in stats if key in s]), key
    acc = next(ax for ax in figures['discriminator'].axes if 'accuracy' in ax.get_title())
    assert len(acc.get_lines()) - 2 == len({k for s in stats for k in s if k.startswith('disc_acc_bin')}) > 1   # + all bins + chance
    assert [list(v) for v in figures['fid'].axes[0].get_lines()[0].get_data()] == [[3, 7], [12.5, 9.0]]
    with pytest.raises(SystemExit, match='--ckpt .*none not found') as error:
        evaluate.main(['plot', '--ckpt', str(tmp_path / 'none')])
    assert '\n' not in str(error.value)

def test_ema_update_is_one_foreach_lerp_equal_to_the_per_parameter_loop(monkeypatch):
    # On the CPU torch._foreach_lerp_ runs the same lerp_ kernel on each tensor in turn, so the update equals the
    # per-parameter loop bit for bit, through EDM's ramp-up (it 0 copies) and a long half-life, on two architectures.
    import copy
    import types
    import training_loop
    calls, foreach_lerp = [], torch._foreach_lerp_
    monkeypatch.setattr(torch, '_foreach_lerp_', lambda *args: calls.append(len(args[0])) or foreach_lerp(*args))
    for net in (fixtures.tiny_songunet(), edm_nets.EDMPrecond(img_resolution=8, img_channels=3, label_dim=10, model_type='DhariwalUNet',
                                                                   model_channels=16, channel_mult=[1, 2], num_blocks=1, attn_resolutions=[4])):
        generator = net.requires_grad_(True)
        ema = copy.deepcopy(generator).requires_grad_(False)
        expect = [p.detach().clone() for p in ema.parameters()]
        opts = types.SimpleNamespace(batch=8, tau=5, ema_halflife_kimg=0.5, ema_rampup=0.05)
        s = types.SimpleNamespace(ema=ema, generator=generator, opts=opts)
        g = torch.Generator().manual_seed(1)
        for it in (0, 5, 10, 1000, 10 ** 6):
            with torch.no_grad():
                for p in generator.parameters():
                    p.add_(torch.randn(p.shape, generator=g))
            beta = training_loop.ema_beta(opts.batch, (it // opts.tau) * opts.batch, opts.ema_halflife_kimg, opts.ema_rampup)
            for e, p in zip(expect, generator.parameters()):
                e.lerp_(p.detach(), 1 - beta)
            training_loop.update_ema(s, it)
            assert all(torch.equal(a, b) for a, b in zip(expect, ema.parameters()))
        assert calls[-5:] == [len(expect)] * 5          # one call per update, over every parameter

def test_bf16_on_cpu_runs_convolutions_in_bf16_and_keeps_losses_ratios_and_states_fp32(files, tmp_path, monkeypatch):
    # Three iterations (a generator step, two critic steps with exact R1) with --precision bf16 and --lr > 0 on the
    # CPU: CPU autocast runs conv2d in bf16 as CUDA's does; every loss, r and its normalisation, and every
    # weight and optimiser state must stay fp32 (the running per-bin means fp64).
    import fdistill
    import training_loop
    opts, task = in_process_task(files, tmp_path, '--iterations', '3', '--precision', 'bf16', '--lr', '1e-3', '--ratio-ema', '0.5', '--num-bins', '1', '--batch', '4', '--workers', '0')
    owners = {id(m): name for name, net in (('generator', task.generator), ('fake_score', task.fake_score), ('head', task.head)) for m in net.modules()}
    convs = {}
    def conv_hook(module, args, out):
        if isinstance(module, (edm_nets.Conv2d, torch.nn.Conv2d)):
            convs.setdefault(owners.get(id(module), 'teacher'), set()).add(out.dtype)
    dtypes = {}
    def record(name, f):
        def wrapped(*args, **kwargs):
            out = f(*args, **kwargs)
            dtypes.setdefault(name, set()).add((out[0] if isinstance(out, tuple) else out).dtype)
            return out
        monkeypatch.setattr(fdistill, name, wrapped)
    for name in ('ratio', 'normalize_ratio', 'normalize_weight', 'generator_loss', 'critic_loss', 'fake_score_loss', 'r1_penalty'):
        record(name, getattr(fdistill, name))
    handle = torch.nn.modules.module.register_module_forward_hook(conv_hook)
    try:
        training_loop.training_loop(opts, task, 0, 1, torch.device('cpu'))
    finally:
        handle.remove()
    assert convs == dict(generator={torch.bfloat16}, fake_score={torch.bfloat16}, teacher={torch.bfloat16}, head={torch.float32})
    assert dtypes == {name: {torch.float32} for name in dtypes} and len(dtypes) == 7, dtypes
    first, last = load(tmp_path, 1), load(tmp_path, 3)
    for key in ('generator', 'generator_ema', 'fake_score', 'head'):
        assert {v.dtype for v in last[key].values()} == {torch.float32}, key
    assert {v.dtype for opt in ('opt_g', 'opt_c') for state in last[opt]['state'].values() for k, v in state.items() if k != 'step'} == {torch.float32}
    assert last['ratio_means'].dtype == torch.float64 and len(last['ratio_means']) == 1
    assert changed(first['fake_score'], last['fake_score']) and changed(first['head'], last['head'])     # it trained
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert all(math.isfinite(v) for s in stats for v in s.values())

def test_tf32_on_cpu_says_it_means_fp32(monkeypatch, capsys):
    import flags
    import train_cifar
    import train_edm
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    opts = flags.parse_args('test', train_cifar.PRESET, train_edm.add_edm_args, ['--precision', 'tf32'])
    assert opts.precision == 'tf32'                     # the recipe a resume on a GPU compares
    assert [line.split(': ', 1)[1] for line in capsys.readouterr().err.splitlines()] == ['--precision tf32 on a CPU means fp32 (TF32 is a CUDA tensor-core format)']
    flags.parse_args('test', train_cifar.PRESET, train_edm.add_edm_args, ['--precision', 'bf16'])
    assert capsys.readouterr().err == ''
    with pytest.raises(SystemExit):
        flags.parse_args('test', train_cifar.PRESET, train_edm.add_edm_args, ['--help'])
    assert 'on a CPU, fp32' in ' '.join(capsys.readouterr().out.split())
