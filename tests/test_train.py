"""train_cifar.py / train_imagenet.py end to end on CPU: a tiny random teacher in the official pickle
format, a synthetic dataset zip, torchrun with gloo."""

import json
import os
import subprocess
import sys

import pytest
import torch

import edm_nets
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

def train(files, outdir, *args, nproc=1, check=True):
    common = ['--teacher', str(files / 'teacher.pkl'), '--data', str(files / 'data.zip'), '--outdir', str(outdir),
              '--batch', '8', '--disc-res', '8,4', '--grid', '4', '--log-every', '1', '--snap-every', '100',
              '--lr', '1e-3', '--ckpt-every', '1', '--keep', '100']
    if nproc == 1:
        cmd = [sys.executable, 'train_cifar.py']
    else:
        cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}', 'train_cifar.py']
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

#----------------------------------------------------------------------------

def test_torchrun_two_processes_end_to_end_and_equal_to_one_process(files, straight, tmp_path):
    out = tmp_path / 'run'
    result = train(files, out, '--iterations', '6', '--ema-halflife-kimg', '0.01', nproc=2)
    assert 'f-distill with forward-KL' in result.stdout
    assert {'training_options.json', 'stats.jsonl', 'log.txt', 'grid-0000000.png', 'grid-0000006.png', 'checkpoint-0000006.pt'} <= set(os.listdir(out))
    stats = [json.loads(line) for line in open(out / 'stats.jsonl')]
    assert [s['iteration'] for s in stats] == list(range(1, 7))
    for s in stats:
        for k, v in s.items():
            assert v == v and abs(v) != float('inf'), f'{k} not finite at iteration {s["iteration"]}'
    assert 'loss_fdistill' in stats[0] and 'loss_dsm' in stats[1]      # Alg. 1: it 0 generator, it 1 critic
    assert 0 < stats[0]['h_ess'] <= 1 and abs(stats[0]['h_mean'] - 1) < 1e-5
    options = json.load(open(out / 'training_options.json'))
    assert options['world_size'] == 2 and options['batch_gpu'] == 4
    a, b = load(straight, 6), load(out, 6)
    assert b['iteration'] == 6 and b['options']['f'] == 'fkl' and b['generator_kwargs']['model_type'] == 'SongUNet'
    # Same global batch on 1 and 2 processes: same parameters. Adam turns fp rounding of tiny gradients
    # into differences up to ~lr per step; a normalisation over the local batch differs by far more.
    for key in ('generator', 'generator_ema', 'fake_score', 'head'):
        assert_same(a[key], b[key], atol=1e-4)
    # Per-sigma-bin diagnostics are all-reduced: the 2-process log equals the 1-process one (iteration 0 is a
    # generator step, h_bar spread; iteration 1 a critic step, accuracy, from the same initial head).
    one = [json.loads(line) for line in open(straight / 'stats.jsonl')]
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

def test_resume_equals_straight_run(files, straight, tmp_path):
    train(files, tmp_path, '--iterations', '4', '--ema-halflife-kimg', '0.01')
    for it in (3, 4):                   # Killed after logging iteration 4 but before checkpointing 3 and 4.
        os.remove(tmp_path / f'checkpoint-{it:07d}.pt')
    train(files, tmp_path, '--iterations', '7', '--ema-halflife-kimg', '0.01', '--resume')
    a, b = load(straight, 7), load(tmp_path, 7)
    for key in ('generator', 'generator_ema', 'fake_score', 'head'):
        assert_same(a[key], b[key], atol=0)
    assert 'Resumed from' in open(tmp_path / 'log.txt').read()
    assert [json.loads(line)['iteration'] for line in open(tmp_path / 'stats.jsonl')] == list(range(1, 8))
    again = train(files, tmp_path, '--iterations', '8', check=False)     # no --resume: refuse to overwrite
    assert 'already holds a run' in again.stderr.strip().splitlines()[-1]

def test_schedule_follows_algorithm1(files, straight):
    # tau = 5: iterations 0 and 5 update only the generator; 1-4 and 6 only the fake score and the head.
    teacher = edm_nets.load_edm_pickle(str(files / 'teacher.pkl'))['ema'].state_dict()
    ckpt = {i: load(straight, i) for i in range(1, 8)}
    assert changed(teacher, ckpt[1]['generator']) and not changed(teacher, ckpt[1]['fake_score'])
    for it in range(1, 7):
        generator_step = it % 5 == 0
        assert changed(ckpt[it]['generator'], ckpt[it + 1]['generator']) == generator_step
        assert changed(ckpt[it]['fake_score'], ckpt[it + 1]['fake_score']) != generator_step
        assert changed(ckpt[it]['head'], ckpt[it + 1]['head']) != generator_step

def test_ema_follows_generator_steps(files, straight):
    # EMA with half-life 0.01 kimg at batch 8: beta = 0.5 ** (8 / 10), updated on generator steps only.
    teacher = edm_nets.load_edm_pickle(str(files / 'teacher.pkl'))['ema'].state_dict()
    beta = 0.5 ** (8 / 10)
    ckpt = {i: load(straight, i) for i in (1, 5, 6)}
    expect1 = {k: beta * teacher[k] + (1 - beta) * ckpt[1]['generator'][k] for k in teacher}
    assert_same(expect1, ckpt[1]['generator_ema'], atol=1e-6)
    assert_same(ckpt[1]['generator_ema'], ckpt[5]['generator_ema'], atol=0)
    expect6 = {k: beta * ckpt[5]['generator_ema'][k] + (1 - beta) * ckpt[6]['generator'][k] for k in teacher}
    assert_same(expect6, ckpt[6]['generator_ema'], atol=1e-6)

def test_warm_start_loads_networks_not_iteration(files, straight, tmp_path):
    train(files, tmp_path, '--iterations', '2', '--lr', '0', '--init-from', str(straight / 'checkpoint-0000007.pt'))
    a, b = load(straight, 7), load(tmp_path, 2)
    for key in ('generator', 'fake_score', 'head'):
        assert_same(a[key], b[key], atol=0)
    assert b['iteration'] == 2

def test_non_finite_losses_are_skipped_then_stop_the_run(files, tmp_path):
    import train_cifar, train_edm, training_loop
    opts = training_loop.parse_args('test', train_cifar.PRESET, train_edm.add_edm_args, [
        '--teacher', str(files / 'teacher.pkl'), '--data', str(files / 'data.zip'), '--outdir', str(tmp_path),
        '--batch', '8', '--disc-res', '8', '--grid', '4', '--iterations', '10', '--ckpt-every', '1', '--log-every', '1', '--max-nan', '3'])
    task = train_edm.build_task(opts, train_cifar.PRESET, torch.device('cpu'), 0, 1)
    task.real = lambda indices: torch.full((len(indices), 3, 8, 8), float('nan'))     # every critic loss NaN
    with pytest.raises(RuntimeError, match='3 non-finite losses in a row at iteration 3'):
        training_loop.training_loop(opts, task, 0, 1, torch.device('cpu'))
    stats = [json.loads(line) for line in open(tmp_path / 'stats.jsonl')]
    assert [s['nan_total'] for s in stats] == [0, 1, 2]
    last = load(tmp_path, 3)                            # Skipped steps leave the networks as they were.
    assert_same(load(tmp_path, 1)['fake_score'], last['fake_score'], atol=0)
    assert all(torch.isfinite(v).all() for v in last['generator'].values())

def test_lpips_regression_pairs_and_loss(files, tmp_path):
    import torchvision
    vgg = {k: v for k, v in torchvision.models.vgg16().state_dict().items() if k.startswith('features.')}
    torch.save(vgg, tmp_path / 'vgg16.pth')
    train(files, tmp_path / 'run', '--iterations', '1', '--reg-weight', '0.25', '--reg-pairs', '4',
                   '--reg-batch', '2', '--reg-steps', '2', '--lpips-vgg', str(tmp_path / 'vgg16.pth'))
    pairs = torch.load(tmp_path / 'run' / 'reg_pairs_4_2steps.pt', weights_only=True)
    teacher = edm_nets.load_edm_pickle(str(files / 'teacher.pkl'))['ema']
    z = edm_nets.StackedRandomGenerator('cpu', [3]).randn([1, 3, 8, 8])
    import dataset
    label = dataset.ImageDataset(str(files / 'data.zip')).one_hot([3], 4)
    expect = edm_nets.edm_sampler(teacher, z, label, num_steps=2).float()
    torch.testing.assert_close(pairs[3:4], expect, atol=1e-5, rtol=0)
    stats = json.loads(open(tmp_path / 'run' / 'stats.jsonl').readline())
    assert stats['loss_reg'] > 0
    missing = train(files, tmp_path / 'run2', '--iterations', '1', '--reg-weight', '0.25', check=False)
    assert '--lpips-vgg' in missing.stderr.strip().splitlines()[-1]

def test_gradient_accumulation_rounds_match_one_round(files, tmp_path):
    # --batch-gpu 4 with batch 8: two accumulation rounds. Normalisation is per round, so the reverse-KL
    # run (h = 1) must match one round exactly; f-distill weights would differ slightly.
    train(files, tmp_path / 'one', '--iterations', '2', '--f', 'rkl')
    train(files, tmp_path / 'acc', '--iterations', '2', '--f', 'rkl', '--batch-gpu', '4')
    for key in ('generator', 'fake_score', 'head'):
        assert_same(load(tmp_path / 'one', 2)[key], load(tmp_path / 'acc', 2)[key], atol=1e-4)

@pytest.mark.parametrize('case', ['unknown_f', 'missing_teacher', 'missing_data', 'resolution_mismatch'])
def test_bad_input_fails_before_training(files, tmp_path, case):
    args = dict(unknown_f=['--f', 'kl2'], missing_teacher=['--teacher', str(tmp_path / 'nope.pkl')],
                missing_data=['--data', str(tmp_path / 'nope.zip')], resolution_mismatch=['--data', str(files / 'data16.zip')])[case]
    result = train(files, tmp_path / 'run', '--iterations', '2', *args, check=False)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    expect = dict(unknown_f='Unknown divergence "kl2"', missing_teacher='nope.pkl', missing_data='nope.zip',
                  resolution_mismatch='3x16x16 images; the teacher wants 3x8x8')[case]
    assert expect in last, last
    assert not os.path.exists(tmp_path / 'run' / 'stats.jsonl')

def test_plot_draws_the_logged_values(straight, tmp_path):
    import shutil
    import PIL.Image
    import evaluate
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
    figures = dict(evaluate.run_figures(stats, json.load(open(run / 'training_options.json')), fid))
    assert sorted(figures) == ['discriminator', 'fid', 'losses', 'speed', 'weights']
    def line(name, title_part, label):
        ax = next(ax for ax in figures[name].axes if title_part in ax.get_title())
        return next(l for l in ax.get_lines() if l.get_label() == label)
    for name, title, label, key in [('losses', 'GAN', 'discriminator', 'loss_gan_d'), ('weights', 'effective', 'ESS', 'h_ess'),
                                    ('discriminator', 'accuracy', 'all bins', 'disc_acc'), ('speed', 'images', 'images/s', 'images_per_sec')]:
        logged = [(s['iteration'], s[key]) for s in stats if key in s]
        assert list(zip(*line(name, title, label).get_data())) == pytest.approx(logged), key
    acc = next(ax for ax in figures['discriminator'].axes if 'accuracy' in ax.get_title())
    assert len(acc.get_lines()) - 2 == len({k for s in stats for k in s if k.startswith('disc_acc_bin')}) > 1   # + all bins + chance
    assert [list(v) for v in figures['fid'].axes[0].get_lines()[0].get_data()] == [[3, 7], [12.5, 9.0]]
    with pytest.raises(SystemExit, match='--ckpt .*none not found') as error:
        evaluate.main(['plot', '--ckpt', str(tmp_path / 'none')])
    assert '\n' not in str(error.value)
