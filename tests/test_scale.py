"""Scaling the training run (issue 11): feature passes that stop after the deepest tap, precision,
gradient clipping, EMA and generator snapshots with FID per snapshot, the benchmark's parts."""

import numpy as np
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import edm_nets
import edm_pickle
import fdistill
import memory_plan
import sd_unet
from test_edm_nets import inputs, randomize, tiny_adm, tiny_song
from test_sd_unet import TINY
from test_train import files                        # noqa: F401 (fixture: tiny teacher pickle, dataset zip)

#----------------------------------------------------------------------------
# Feature passes. The truth is the full pass (decoder='grad', as before): 'no_grad' and 'skip' must give
# the same features and D(x) bit for bit (the same operations run on the same values) and the same
# gradients to the input (the decoder is not on the path from the features to any loss), and must not run
# what they skip.

def decoder_calls(net):
    calls = []
    for module in net.model.dec.values():
        module.register_forward_hook(lambda *_: calls.append(1))
    return calls

@pytest.mark.parametrize('make, resolutions', [(tiny_song, (16, 8)), (tiny_song, (16,)), (tiny_adm, (8,)), (tiny_adm, (16,))])
def test_edm_feature_pass_equals_full_pass(make, resolutions):
    net = randomize(make()).eval().requires_grad_(False)
    x, sigma, labels = inputs()
    calls = decoder_calls(net)
    out = {}
    for decoder in ('grad', 'no_grad', 'skip'):
        calls.clear()
        x_ = x.clone().requires_grad_(True)
        D_x, features = net.forward_features(x_, sigma, labels, resolutions, decoder=decoder)
        grad, = torch.autograd.grad(sum(f.square().sum() for f in features), x_)
        out[decoder] = D_x, features, grad, len(calls)
    D_full, f_full, g_full, n_full = out['grad']
    assert n_full == len(net.model.dec) and D_full.requires_grad
    D_x, features, grad, n = out['no_grad']
    assert torch.equal(D_x, D_full) and not D_x.requires_grad and n == n_full
    assert all(torch.equal(a, b) for a, b in zip(features, f_full)) and torch.equal(grad, g_full)
    D_x, features, grad, n = out['skip']
    assert D_x is None and n == 0
    assert all(torch.equal(a, b) for a, b in zip(features, f_full)) and torch.equal(grad, g_full)
    with pytest.raises(ValueError, match='decoder must be one of'):
        net.forward_features(x, sigma, labels, resolutions, decoder='none')

def test_sd_feature_pass_equals_full_pass_and_skips_the_cfg_pass():
    torch.manual_seed(0)
    unet = sd_unet.SDUNet(**TINY).eval().requires_grad_(False)
    ctx, uncond = torch.randn(2, 5, 32), torch.randn(1, 5, 32)
    x, sigma = torch.randn(2, 4, 8, 8) * 3, torch.tensor([0.5, 3.0])
    calls = []
    unet.conv_in.register_forward_hook(lambda *_: calls.append('unet'))
    unet.conv_out.register_forward_hook(lambda *_: calls.append('up'))
    out = {}
    for decoder in ('grad', 'no_grad', 'skip'):
        calls.clear()
        x_ = x.clone().requires_grad_(True)
        D_x, features = sd_unet.sd_denoiser(unet, ctx, uncond, 1.75)(x_, sigma, return_features=True, decoder=decoder)
        grad, = torch.autograd.grad(features['mid'].square().sum(), x_)
        out[decoder] = D_x, features['mid'], grad, list(calls)
    D_full, mid_full, g_full, calls_full = out['grad']
    assert calls_full == ['unet', 'up', 'unet', 'up']            # conditional and unconditional (CFG) passes
    D_x, mid, grad, calls_ = out['no_grad']
    assert torch.equal(D_x, D_full) and not D_x.requires_grad and calls_ == calls_full
    assert torch.equal(mid, mid_full) and torch.equal(grad, g_full)
    D_x, mid, grad, calls_ = out['skip']
    assert D_x is None and calls_ == ['unet']                     # no up blocks, no unconditional pass
    assert torch.equal(mid, mid_full) and torch.equal(grad, g_full)

# Through Alg. 1's two steps: the loop's teacher modes give today's losses and gradients exactly.
def test_generator_and_critic_steps_with_feature_passes_equal_full_passes():
    net = randomize(tiny_song()).eval().requires_grad_(False)
    generator = edm_nets.make_generator(net)
    fake = edm_nets.copy_without_dropout(net)
    head = fdistill.DiscriminatorHead(edm_nets.feature_channels(net, (16, 8)), [16, 8])
    x, sigma, labels = inputs()
    g = torch.Generator().manual_seed(3)
    z, noise, x_real, noise_fake = torch.randn(4, 2, 3, 16, 16, generator=g)
    levels = fdistill.karras_sigmas()
    edges = fdistill.sigma_bin_edges(levels, 4)
    teacher = lambda decoder: lambda x, s: net.forward_features(x, s, labels, (16, 8), decoder=decoder)
    fake_score = lambda x, s: fake(x, s, labels)

    def generator_grads(decoder):
        generator.zero_grad(set_to_none=True)
        head.requires_grad_(False)
        loss, _ = fdistill.generator_loss(y=generator(z, labels), draws=fdistill.GeneratorNoise(sigma, noise), teacher=teacher(decoder),
                                          fake_score=fake_score, head=head, div=fdistill.divergence('js'), ratio_norm=fdistill.RatioNorm(1e-2, 1e2, edges), w_gan=0.5)
        loss.backward()
        head.requires_grad_(True)
        return loss, [p.grad for p in generator.parameters()]

    def critic_grads(decoder):
        fake.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        with torch.no_grad():
            y = generator(z, labels)
        loss, _ = fdistill.critic_loss(y=y, x_real=x_real, draws=fdistill.CriticNoise(sigma, noise, sigma, noise_fake, noise), teacher=teacher(decoder),
                                       fake_score=fake_score, head=head, gamma=1.0)
        loss.backward()
        return loss, [p.grad for p in list(fake.parameters()) + list(head.parameters())]

    for grads, mode in ((generator_grads, 'no_grad'), (critic_grads, 'skip')):
        loss_full, grads_full = grads('grad')
        loss, grads_new = grads(mode)
        assert torch.equal(loss, loss_full)
        assert all(torch.equal(a, b) for a, b in zip(grads_new, grads_full))

#----------------------------------------------------------------------------
# Precision, gradient clipping, snapshots and FID per snapshot, warm start from a snapshot: one short run of
# the real loop on the CIFAR task (tiny official-format teacher), then the evaluation and a second run.
def test_clipping_snapshots_fid_per_snapshot_and_warm_start(files, tmp_path, monkeypatch):
    import collections, json, os
    import evaluate, flags, rundir, train_cifar, train_edm, training_loop
    from test_evaluate import TinyDetector
    cpu = torch.device('cpu')

    def run_opts(outdir, *args):
        opts = flags.parse_args('test', train_cifar.PRESET, train_edm.add_edm_args, [
            '--teacher', str(files / 'teacher.pkl'), '--data', str(files / 'data.zip'), '--outdir', str(outdir), '--batch', '4',
            '--disc-res', '8', '--grid', '4', '--log-every', '1', '--lr', '1e-3', *args])
        return opts, train_edm.build_task(opts, train_cifar.PRESET, cpu, 0, 1)

    def run(outdir, *args):
        opts, task = run_opts(outdir, *args)
        training_loop.training_loop(opts, task, 0, 1, cpu)
        return opts, task

    # The gradient norm of each network when AdamW steps, seen from the optimiser itself.
    seen, adamw_step = [], torch.optim.AdamW.step
    def step(self, *args, **kwargs):
        norms = collections.defaultdict(float)
        for group in self.param_groups:
            for p in group['params']:
                if p.grad is not None:
                    norms[names[id(p)]] += p.grad.double().square().sum().item()
        seen.append({k: v ** 0.5 for k, v in norms.items()})
        return adamw_step(self, *args, **kwargs)
    monkeypatch.setattr(torch.optim.AdamW, 'step', step)
    build = train_edm.build_task
    def build_and_name(*args):
        task = build(*args)
        names.update({id(p): name for name, net in (('generator', task.generator), ('fake_score', task.fake_score), ('head', task.head)) for p in net.parameters()})
        return task
    names = {}
    monkeypatch.setattr(train_edm, 'build_task', build_and_name)
    # The real samples each critic step gets from the DataLoader's worker processes.
    reals, critic_loss = {}, fdistill.critic_loss
    def record(**kwargs):
        reals[len(reals)] = kwargs['x_real']
        return critic_loss(**kwargs)
    monkeypatch.setattr(fdistill, 'critic_loss', record)

    out = tmp_path / 'run'
    clip = 0.05
    opts, task = run(out, '--iterations', '3', '--snap-every', '2', '--ckpt-every', '3', '--grad-clip', str(clip), '--ema-halflife-kimg', '0.01')
    assert opts.precision == 'fp32' and opts.ema_halflife_kimg == 0.01
    # Clipping: AdamW sees min(norm, clip) for every network, the norm before clipping being what stats report.
    stats = [json.loads(line) for line in open(out / 'stats.jsonl')]
    reported = [{k[len('grad_norm_'):]: v for k, v in s.items() if k.startswith('grad_norm_')} for s in stats]
    assert [sorted(r) for r in reported] == [['generator'], ['fake_score', 'head'], ['fake_score', 'head']]
    assert [sorted(s) for s in seen] == [sorted(r) for r in reported]
    clipped = 0
    for r, s in zip(reported, seen):
        for name in r:
            assert s[name] == pytest.approx(min(r[name], clip), rel=1e-4)   # clip * norm / (norm + 1e-6), float32 sums
            clipped += r[name] > clip
    assert clipped > 0
    # DataLoader (2 workers, one zip handle each): iteration it reads the items data_indices(seed, it) names.
    import dataset
    data = dataset.ImageDataset(str(files / 'data.zip'))
    for k, it in enumerate((1, 2)):
        assert torch.equal(reals[k], data.images(training_loop.data_indices(0, it, len(data), 4)).float() / 127.5 - 1)
    # Snapshots at 0 (the teacher copy), every --snap-every and at the end: generator and EMA only.
    teacher = edm_pickle.load_edm_pickle(str(files / 'teacher.pkl'))['ema'].state_dict()
    snaps = {it: rundir.load_checkpoint(str(out / f'snapshot-{it:07d}.pt')) for it in (0, 2, 3)}
    ckpt = rundir.load_checkpoint(str(out / 'checkpoint-0000003.pt'))
    assert set(snaps[3]) == {'iteration', 'options', 'generator_kwargs', 'sigma_init', 'head_kwargs', 'generator', 'generator_ema'}
    assert all(torch.equal(snaps[0]['generator'][k], teacher[k]) for k in teacher)
    for key in ('generator', 'generator_ema'):
        assert all(torch.equal(snaps[3][key][k], ckpt[key][k]) for k in teacher)

    # FID per snapshot equals the plain FID command on that snapshot file; the best is the minimum.
    detector = str(tmp_path / 'detector.pt')
    torch.jit.script(TinyDetector(32)).save(detector)
    common = ['--ref', str(files / 'data.zip'), '--detector', detector, '--num-images', '6', '--no-pr']
    evaluate.main(['fid', '--ckpt', str(out), '--snapshots', *common])
    result = json.load(open(out / 'fid-snapshots.json'))
    assert [e['iteration'] for e in result['snapshots']] == [0, 2, 3] and all(e['num_images'] == 6 for e in result['snapshots'])
    best = min(result['snapshots'], key=lambda e: e['fid'])
    assert result['best'] == dict(iteration=best['iteration'], path=best['path'], fid=best['fid'], weights=best['weights'])
    assert os.path.getsize(out / 'fid-snapshots.png') > 0
    evaluate.main(['fid', '--ckpt', str(out / 'snapshot-0000002.pt'), *common, '--report', str(tmp_path / 'one.json')])
    assert json.load(open(tmp_path / 'one.json'))['sets'][0]['fid'] == pytest.approx(result['snapshots'][1]['fid'], rel=1e-9)
    with pytest.raises(SystemExit, match='--snapshots scores the snapshots of a run'):
        evaluate.main(['fid', '--ckpt', str(out / 'snapshot-0000002.pt'), '--snapshots', *common])

    # --benchmark: each step split into disjoint timed parts (so they sum to at most the step), R1's own cost.
    bench = training_loop.training_loop(*run_opts(tmp_path / 'bench', '--benchmark', '1'), 0, 1, cpu)
    for kind in ('generator_step', 'critic_step'):
        assert set(bench[f'sec_parts_{kind}']) == {'generator', 'teacher', 'fake_score', 'head', 'backward', 'optimiser'}
        assert all(v > 0 for v in bench[f'sec_parts_{kind}'].values())
    assert sum(bench['sec_parts_critic_step'].values()) <= bench['sec_critic_step'] * 1.5 and 'sec_r1' in bench
    # Its FLOPs per step are FlopCounterMode's count of the same steps on a state of its own (FLOPs do not depend
    # on the weights: exact); on a CPU there is no peak to compare with, so no utilisation.
    s = training_loop.setup(*run_opts(tmp_path / 'flops', '--benchmark', '1'), 0, 1, cpu)
    for kind, step in (('generator_step', lambda: training_loop.generator_step(s, training_loop.draw(s, 0, True))),
                       ('critic_step', lambda: training_loop.critic_step(s, training_loop.draw(s, 1, False)))):
        with memory_plan.leaf_inputs_unhooked(), FlopCounterMode(display=False) as counter:     # exact R1's leaf input
            step()
        assert bench[f'flops_{kind}'] == counter.get_total_flops() > 0
    assert bench['mfu'] is None and bench['peak_tflops'] is None

    # Warm start from a snapshot, in bf16 autocast: the generator comes from it, the fake score is the
    # teacher as in a new run, the weights stay fp32.
    out2 = tmp_path / 'warm'
    run(out2, '--iterations', '2', '--lr', '0', '--wd', '0', '--init-from', str(out / 'snapshot-0000003.pt'), '--precision', 'bf16')
    warm = rundir.load_checkpoint(str(out2 / 'checkpoint-0000002.pt'))
    assert warm['options']['precision'] == 'bf16'
    assert all(torch.equal(warm['generator'][k], snaps[3]['generator'][k]) for k in teacher)
    assert all(torch.equal(warm['fake_score'][k], teacher[k]) for k in teacher)
    assert all(v.dtype == torch.float32 for v in list(warm['generator'].values()) + list(warm['head'].values()) if v.is_floating_point())
    assert all(np.isfinite(v) for s in map(json.loads, open(out2 / 'stats.jsonl')) for v in s.values())

#----------------------------------------------------------------------------
# SD specifics: the fake score's DSM in eps-MSE, and R1 by finite differences.

def test_eps_weight_dsm_is_sd_eps_mse():
    torch.manual_seed(1)
    unet = sd_unet.SDUNet(**TINY).eval()
    ctx = torch.randn(3, 5, 32)
    y, noise = torch.randn(2, 3, 4, 8, 8)
    sigma = sd_unet.SIGMAS[[0, 500, 999]].float()
    loss = fdistill.fake_score_loss(sd_unet.sd_denoiser(unet, ctx), y, sigma, noise, weight=fdistill.eps_weight)
    # independent: SD's own training loss at those timesteps, x_t = sqrt(abar) y + sqrt(1 - abar) eps
    with torch.no_grad():
        eps_hat = unet(sd_unet.add_noise(y, noise, [0, 500, 999]), torch.tensor([0, 500, 999]), ctx)
    torch.testing.assert_close(loss.detach(), (eps_hat - noise).square().mean(), rtol=1e-4, atol=0)

def test_approximate_r1_tends_to_exact_r1():
    # Along the d basis directions, sum_i ((logit(x + alpha e_i) - logit(x)) / alpha)^2 = ||grad logit||^2 + O(alpha):
    # one batch holds the same noised real input d times, noise_r1[i] = e_i.
    from test_fdistill import TinyTeacher
    torch.manual_seed(2)
    teacher, head = TinyTeacher().requires_grad_(False), fdistill.DiscriminatorHead([8], [8])
    d = 2 * 8 * 8
    x_real = torch.randn(1, 2, 8, 8).expand(d, -1, -1, -1)
    sigma, zeros = torch.full([d], 0.7), torch.zeros(d, 2, 8, 8)
    fake_score = lambda x, s: x
    basis = torch.eye(d).reshape(d, 2, 8, 8)
    args = dict(y=torch.zeros(d, 2, 8, 8), x_real=x_real, teacher=teacher, fake_score=fake_score, head=head, gamma=1.0)
    _, exact = fdistill.critic_loss(**args, draws=fdistill.CriticNoise(sigma, zeros, sigma, zeros, zeros))
    _, approx = fdistill.critic_loss(**args, draws=fdistill.CriticNoise(sigma, zeros, sigma, zeros, zeros, basis), r1_alpha=1e-3)
    assert exact['loss_r1'] > 0
    assert approx['loss_r1'] * d == pytest.approx(exact['loss_r1'], rel=2e-2)   # float32 differences at alpha 1e-3
    assert approx['loss_gan_d'] == exact['loss_gan_d']

#----------------------------------------------------------------------------
# Stage-1 ratio bins with an EMA across iterations.

def test_ratio_bin_means_ema_across_iterations():
    edges = torch.tensor([1.0, 10.0])                       # three bins: below 1, 1 to 10, above 10
    running = torch.full([3], float('nan'), dtype=torch.float64)
    r1, s1 = torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([0.5, 0.5, 5.0, 5.0])
    out = fdistill.normalize_ratio(r1, s1, edges, running, beta=0.5)
    assert torch.equal(out, fdistill.normalize_ratio(r1, s1, edges))           # first batch: its own means
    assert running[0] == 2 and running[1] == 4 and torch.isnan(running[2])
    r2, s2 = torch.tensor([4.0, 8.0, 5.0]), torch.tensor([0.5, 0.5, 50.0])
    out = fdistill.normalize_ratio(r2, s2, edges, running, beta=0.5)
    # by hand: bin 0 mean 0.5 * 2 + 0.5 * 6 = 4, bin 1 (absent) keeps 4, bin 2 starts at its batch mean 5
    assert running.tolist() == [4.0, 4.0, 5.0]
    assert torch.equal(out, torch.tensor([1.0, 2.0, 1.0]))
