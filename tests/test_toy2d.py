import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fdistill
import toy2d

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#----------------------------------------------------------------------------
# Fig. 4a: closed forms from E_q[r^a] = exp(a(a-1) mu^2/2) for r = exp(mu x - mu^2/2), x ~ N(0,1).

def closed_form(name, mu):
    if name == 'rkl':
        return 0.0
    if name == 'fkl':                       # h = r: E[r^2]/E[r]^2 - 1
        return math.exp(mu ** 2) - 1
    if name == 'jeffreys':                  # h = r + 1: Var(r) / 4
        return (math.exp(mu ** 2) - 1) / 4
    if name == 'hellinger':                 # h = sqrt(r)/4: E[r] / E[sqrt r]^2 - 1
        return 1 / math.exp(-mu ** 2 / 8) ** 2 - 1

@pytest.mark.parametrize('name', ['rkl', 'fkl', 'jeffreys', 'hellinger'])
def test_fig4a_quadrature_matches_closed_form(name):
    for mu in [0.3, 1.0, 2.0, 3.0]:
        truth = closed_form(name, mu)
        assert toy2d.normalized_variance_quadrature(name, mu) == pytest.approx(truth, rel=1e-6, abs=1e-9)
        assert toy2d.normalized_variance(name, mu) == pytest.approx(truth, rel=1e-12, abs=1e-12)

# srkl and js have no closed form here: check scipy's adaptive quadrature against Gauss-Hermite.
@pytest.mark.parametrize('name', ['srkl', 'js'])
def test_fig4a_quadrature_matches_gauss_hermite(name):
    x, w = np.polynomial.hermite_e.hermegauss(200)
    w = w / w.sum()
    h = fdistill.divergence(name).h
    for mu in [0.5, 1.5, 3.0]:
        hx = h(torch.tensor(mu * x - mu ** 2 / 2, dtype=torch.float64).exp()).numpy()
        truth = (w * hx ** 2).sum() / (w * hx).sum() ** 2 - 1
        assert toy2d.normalized_variance(name, mu) == pytest.approx(truth, rel=1e-6)

#----------------------------------------------------------------------------
# The analytic teacher: D(x; sigma) = x + sigma^2 grad log p_sigma(x) (EDM Eq. 3), with the noised
# mixture density written independently with torch.distributions and differentiated by autograd.

def test_mixture_denoiser_matches_autograd_of_log_density():
    mixture = toy2d.ring(num_modes=5, radius=1.5, std=0.3)
    mixture.weights = torch.tensor([0.1, 0.3, 0.2, 0.25, 0.15])
    x = (torch.randn(64, 2, dtype=torch.float64) * 2).requires_grad_(True)
    sigma = torch.exp(torch.randn(64, dtype=torch.float64) * 1.5).clamp(0.01, 20)
    std = torch.sqrt(mixture.std ** 2 + sigma ** 2)[:, None, None].expand(64, 5, 2)
    p = torch.distributions.MixtureSameFamily(
        torch.distributions.Categorical(probs=mixture.weights.double().expand(64, 5)),
        torch.distributions.Independent(torch.distributions.Normal(mixture.means.double().expand(64, 5, 2), std), 1))
    score, = torch.autograd.grad(p.log_prob(x).sum(), x)
    D = mixture.denoise(x.detach(), sigma)
    torch.testing.assert_close(D, x.detach() + sigma[:, None] ** 2 * score, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(mixture.log_prob(x.detach(), sigma), p.log_prob(x.detach()), rtol=0, atol=1e-6)  # float32 weights

# Tweedie by Monte Carlo: E[x0 | x] = sum_i x0_i N(x; x0_i, sigma^2) / sum_i N(x; x0_i, sigma^2), x0_i ~ p.
def test_mixture_denoiser_matches_monte_carlo_posterior_mean():
    mixture = toy2d.ring()
    x0 = mixture.sample(400000, torch.Generator().manual_seed(1)).double()
    x = torch.tensor([[2.0, 0.3], [0.0, 0.0], [-1.0, 1.2]], dtype=torch.float64)
    sigma = torch.tensor([0.3, 1.0, 2.0], dtype=torch.float64)
    logw = -(x[:, None] - x0[None]).square().sum(-1) / (2 * sigma[:, None] ** 2)
    mc = (logw.softmax(1)[:, :, None] * x0[None]).sum(1)
    torch.testing.assert_close(mixture.denoise(x, sigma), mc, rtol=0, atol=0.02)

#----------------------------------------------------------------------------
# Metrics against known distributions: the true mixture (3-std disc of a 2-D Gaussian holds
# 1 - exp(-4.5) of its mass) and the skewed 0.7/0.3 start (TV = 0.5 * (0.575 + 0.175 + 6/8) = 0.75).

def test_mode_metrics_on_true_and_skewed_distributions():
    mixture = toy2d.ring()
    m = toy2d.mode_metrics(mixture.sample(40000, torch.Generator().manual_seed(0)), mixture)
    assert m['modes_covered'] == 8 and m['tv'] < 0.02
    assert m['off_mode'] == pytest.approx(math.exp(-4.5), abs=0.003)
    skewed = toy2d.skewed_target(torch.randn(40000, 2, generator=torch.Generator().manual_seed(0)), mixture)
    m = toy2d.mode_metrics(skewed, mixture)
    assert m['modes_covered'] == 2
    assert m['tv'] == pytest.approx(0.75, abs=0.01)
    assert m['occupancy'][0] == pytest.approx(0.7, abs=0.01)

#----------------------------------------------------------------------------
# The discriminator head on the frozen teacher features recovers log p_t/q_t for a known q.

@pytest.fixture
def one_thread():      # tiny networks run fastest on one thread; restored afterwards
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)

def test_discriminator_on_teacher_features_learns_log_ratio(one_thread):
    torch.manual_seed(0)
    mixture = toy2d.ring()
    levels = fdistill.karras_sigmas(1000, 0.002, 5.0)
    teacher = toy2d.Teacher(mixture, sigma_data=1.43)
    q = toy2d.GaussianMixture(mixture.means[:3], [0.6, 0.3, 0.1], 0.25)
    fake_score = toy2d.FakeScore(1.43)
    head = fdistill.DiscriminatorHead(channels=[teacher.channels], resolutions=[1], hidden=64)
    opt = torch.optim.Adam([*fake_score.parameters(), *head.parameters()], lr=1e-3)
    B = 256
    for _ in range(300):
        loss, _ = fdistill.critic_loss(y=q.sample(B), x_real=mixture.sample(B), draws=fdistill.CriticNoise(fdistill.sample_sigma(levels, B), torch.randn(B, 2),
            fdistill.sample_sigma(levels, B), torch.randn(B, 2), torch.randn(B, 2)), teacher=teacher, fake_score=fake_score, head=head, gamma=0.0, sigma_data=1.43)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        sigma = fdistill.sample_sigma(levels, 4000)
        x = q.sample(4000) + sigma[:, None] * torch.randn(4000, 2)
        truth = mixture.log_prob(x, sigma) - q.log_prob(x, sigma)
        logits = head(teacher(x, sigma[:, None])[1])
    assert torch.corrcoef(torch.stack([truth, logits]))[0, 1] > 0.9

#----------------------------------------------------------------------------
# The toy's generator step: with w_t = 1/sigma the gradient reaching y is h_bar (D_fake - D_teacher) / sigma
# per element (Eq. 4, divided by y.numel() by the mse), h_bar from fdistill.weights; with 'dmd' it is
# fdistill.generator_loss exactly. float64 teacher and fake score; h_bar and the loss are float32 in fdistill.

def test_generator_loss_weighting(one_thread):
    torch.manual_seed(0)
    mixture = toy2d.ring(std=0.05)
    teacher = toy2d.Teacher(mixture, sigma_data=1.41).double()
    fake_score = toy2d.FakeScore(1.41).double()
    head = fdistill.DiscriminatorHead(channels=[teacher.channels], resolutions=[1], hidden=16)      # float32 inside, as in fdistill
    levels = fdistill.karras_sigmas(1000, 0.002, 5.0)
    edges = fdistill.sigma_bin_edges(levels, 4)
    div = fdistill.divergence('fkl')
    y = torch.randn(64, 2, dtype=torch.float64, requires_grad=True)
    sigma, noise = fdistill.sample_sigma(levels, 64).double(), torch.randn(64, 2, dtype=torch.float64)
    o = dict(weighting='eps', w_gan=0.0, r_min=1e-3, r_max=1e3)
    loss, stats = toy2d.generator_loss(y, sigma, noise, teacher, fake_score, head, div, edges, o=o)
    grad, = torch.autograd.grad(loss, y)
    with torch.no_grad():
        x_t = y + sigma[:, None] * noise
        D_teacher, features = teacher(x_t, sigma[:, None])
        h_bar = fdistill.weights(head(features), sigma, div, 1e-3, 1e3, edges)
        expected = h_bar[:, None] * (fake_score(x_t, sigma[:, None]) - D_teacher) / sigma[:, None] / y.numel()
    assert stats['h_ess'] < 1                                   # h varies: the weights are not all equal
    # fdistill's mse forms y - (y - grad) in float32: an absolute error of a few eps32 * |y| per element.
    atol = 4 * torch.finfo(torch.float32).eps * y.abs().max().item() / y.numel()
    torch.testing.assert_close(grad, expected.to(grad.dtype), rtol=1e-5, atol=atol)
    for w_gan in [0.0, 1e-3]:
        o = dict(weighting='dmd', w_gan=w_gan, r_min=1e-3, r_max=1e3)
        ours, _ = toy2d.generator_loss(y, sigma, noise, teacher, fake_score, head, div, edges, o=o)
        theirs, _ = fdistill.generator_loss(y=y, draws=fdistill.GeneratorNoise(sigma, noise), teacher=teacher, fake_score=fake_score, head=head,
                                            div=div, ratio_norm=fdistill.RatioNorm(1e-3, 1e3, edges), w_gan=w_gan)
        assert ours.item() == theirs.item()

#----------------------------------------------------------------------------
# The Ensemble of R networks on an interleaved batch: its output and the gradient of R times the batch-mean loss
# equal, copy by copy, those of the R plain networks on their own rows (autograd on separate modules).
# The fake score in float64, so only the summation order differs: a few ulps. fdistill's head computes in float32:
# batched and plain matmuls sum in different orders, ~1e-6 relative over its 8-term sums, so rtol 1e-4.

def test_ensemble_matches_separate_networks(one_thread):
    torch.manual_seed(0)
    R, n = 3, 16
    nets = [toy2d.FakeScore(1.4).double() for _ in range(R)]
    heads = [fdistill.DiscriminatorHead(channels=[8], resolutions=[1], hidden=8) for _ in range(R)]
    ensemble, ensemble_head = toy2d.Ensemble(nets), toy2d.Ensemble(heads)
    x, sigma = torch.randn(R * n, 2, dtype=torch.float64), torch.rand(R * n, 1, dtype=torch.float64) + 0.1
    features = torch.randn(2 * R * n, 8, 1, 1)   # two interleaved batches joined, as critic_loss does
    loss = (ensemble(x, sigma).square().mean() + ensemble_head([features]).square().mean()) * R
    loss.backward()
    for r in range(R):
        rows = torch.cat([torch.arange(r, R * n, R), R * n + torch.arange(r, R * n, R)])
        own = nets[r](x[r::R], sigma[r::R]).square().mean() + heads[r]([features[rows]]).square().mean().double()
        own.backward()
        torch.testing.assert_close(ensemble.member(r)(x[r::R], sigma[r::R]), nets[r](x[r::R], sigma[r::R]), rtol=1e-12, atol=1e-12)
        for module, stacked, rtol in [(nets[r], ensemble, 1e-10), (heads[r], ensemble_head, 1e-4)]:
            grads = {k.replace(':', '.'): p.grad[r] for k, p in stacked.params.items()}
            for k, p in module.named_parameters():
                torch.testing.assert_close(grads[k], p.grad, rtol=rtol, atol=rtol * p.grad.abs().max().item())

#----------------------------------------------------------------------------
# Bad flags end as one line `toy2d.py: error: ...` naming the flag, exit status 2, before anything is
# computed or written: as real processes (started together, each mostly imports torch), then the rest
# of the checks through parse_args in this process.

def check_one_line_error(returncode, stdout, stderr, flag):
    errors = [line for line in stderr.splitlines() if 'error' in line.lower()]
    assert returncode == 2, stderr
    assert errors == [stderr.strip().splitlines()[-1]] and errors[0].startswith(f'toy2d.py: error: {flag} '), stderr
    assert stdout == '', stdout                                         # not one progress line

def test_bad_flags_fail_in_one_line_before_any_work(tmp_path):
    cases = [(['--steps', '0'], '--steps'), (['--seeds', '-1'], '--seeds'), (['--r-min', '5', '--r-max', '2'], '--r-min')]
    procs = [subprocess.Popen([sys.executable, 'toy2d.py', *flags, '--outdir', str(tmp_path / 'out')], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for flags, _ in cases]
    for proc, (flags, name) in zip(procs, cases):
        stdout, stderr = proc.communicate(timeout=600)
        check_one_line_error(proc.returncode, stdout, stderr, name)
    assert os.listdir(tmp_path) == []                                   # no output folder, no file

@pytest.mark.parametrize('flags,name', [(['--steps', '-3'], '--steps'), (['--seeds', '0'], '--seeds'), (['--workers', '0'], '--workers'),
    (['--r-min', '0'], '--r-min'), (['--r-max', 'inf'], '--r-max'), (['--r-max', '0.5'], '--r-max'), (['--settings', 'main,nope'], '--settings'),
    (['--settings', 'main,main'], '--settings'), (['--w-gan', '-1'], '--w-gan'), (['--lr-head', '0'], '--lr-head'), (['--sigma-max', 'nan'], '--sigma-max')])
def test_bad_flag_values(flags, name, capsys):
    with pytest.raises(SystemExit) as exit:
        toy2d.parse_args(flags)
    captured = capsys.readouterr()
    check_one_line_error(exit.value.code, captured.out, captured.err, name)

#----------------------------------------------------------------------------
# End to end: --quick writes every figure and table, with Fig. 4a's closed forms in the JSON and the
# mode-coverage schema: per setting, per divergence, one entry per seed; results.md shows the same numbers.

def test_quick_run_writes_all_outputs(tmp_path):
    out = tmp_path / 'toy'
    proc = subprocess.run([sys.executable, 'toy2d.py', '--quick', '--seeds', '2', '--steps', '5', '--workers', '1', '--outdir', str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)  # ~20 s alone; a guard against hangs, not a speed test
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ['f_and_h.png', 'variance.png', 'score_weight.png', 'fig8.png', 'mode_coverage.png', 'learning_curves.png', 'results.json', 'results.md']:
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / 'results.json').read_text())
    v = results['variance_vs_mean_difference']
    assert set(toy2d.NAMES) <= set(v)
    for name in ['rkl', 'fkl', 'jeffreys', 'hellinger']:
        np.testing.assert_allclose(v[name], [closed_form(name, mu) for mu in v['mu']], rtol=1e-9, atol=1e-12)
    assert v['mu'][-1] == pytest.approx(3.0)
    coverage = results['mode_coverage']
    assert list(coverage) == ['main', 'with_gan']
    assert coverage['main']['w_gan'] == 0 and coverage['with_gan']['w_gan'] == 1e-3
    table = (out / 'results.md').read_text()
    for setting, c in coverage.items():
        assert c['num_modes'] == 8 and set(toy2d.NAMES) <= set(c)
        for name in toy2d.NAMES:
            m = c[name]
            assert all(len(m[key]) == 2 for key in ['modes', 'tv', 'weight_variance', 'off_mode'])
            assert all(0 <= k <= 8 for k in m['modes']) and all(0 <= tv <= 1 for tv in m['tv'])
            steps = [[h['step'] for h in seed] for seed in m['history']]   # the learning curve: the start, then every history_every steps
            assert steps == [list(range(0, 6, results['options']['history_every']))] * 2
            row = f"| {name} | {fdistill.divergence(name).mode_seeking} | {toy2d.mean_std(m['modes'], '.1f')} ({', '.join(map(str, m['modes']))}) | {toy2d.mean_std(m['tv'], '.3f')} |"
            assert row in table, row
        assert c['rkl']['weight_variance'] == [0, 0]         # h = 1 has no variance
        assert min(c['fkl']['weight_variance']) > 0
    assert table.count('| rkl |') == 3                       # one row per setting, one in the Fig. 4a table

# Results land as each setting finishes: when the second setting fails, the first one's table, JSON and figures
# are on disk and the error still ends the run.
def test_failed_setting_keeps_finished_ones(tmp_path, monkeypatch, one_thread):
    distill = toy2d.distill
    def failing(o, starts, **kwargs):
        if o['setting'] == 'with_gan':
            raise RuntimeError('with_gan broke')
        return distill(o, starts, **kwargs)
    monkeypatch.setattr(toy2d, 'distill', failing)
    with pytest.raises(RuntimeError, match='with_gan broke'):
        toy2d.main(['--quick', '--steps', '2', '--workers', '1', '--outdir', str(tmp_path)])
    results = json.loads((tmp_path / 'results.json').read_text())
    assert list(results['mode_coverage']) == ['main']
    assert '**main**' in (tmp_path / 'results.md').read_text() and '**with_gan**' not in (tmp_path / 'results.md').read_text()
    for name in ['fig8.png', 'mode_coverage.png', 'learning_curves.png']:
        assert (tmp_path / name).stat().st_size > 0, name
