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
        loss, _ = fdistill.critic_loss(q.sample(B), mixture.sample(B), fdistill.sample_sigma(levels, B), torch.randn(B, 2),
            fdistill.sample_sigma(levels, B), torch.randn(B, 2), torch.randn(B, 2), teacher, fake_score, head, 0.0, 1.43)
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
# End to end: --quick writes every figure and table, with Fig. 4a's closed forms in the JSON.

def test_quick_run_writes_all_outputs(tmp_path):
    out = tmp_path / 'toy'
    proc = subprocess.run([sys.executable, 'toy2d.py', '--quick', '--workers', '1', '--outdir', str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ['f_and_h.png', 'variance.png', 'score_weight.png', 'mode_coverage.png', 'results.json', 'results.md']:
        assert (out / name).stat().st_size > 0, name
    results = json.loads((out / 'results.json').read_text())
    v = results['variance_vs_mean_difference']
    assert set(toy2d.NAMES) <= set(v)
    for name in ['rkl', 'fkl', 'jeffreys', 'hellinger']:
        np.testing.assert_allclose(v[name], [closed_form(name, mu) for mu in v['mu']], rtol=1e-9, atol=1e-12)
    assert v['mu'][-1] == pytest.approx(3.0)
    for name in toy2d.NAMES:
        m = results['mode_coverage'][name]
        assert {'modes_covered', 'num_modes', 'tv', 'off_mode', 'weight_variance', 'seconds', 'seeds'} <= set(m)
        assert m['num_modes'] == 8 and m['seeds'] == 1 and 0 <= m['tv'] <= 1
    assert results['mode_coverage']['rkl']['weight_variance'] == 0     # h = 1 has no variance
    assert results['mode_coverage']['fkl']['weight_variance'] > 0
    table = (out / 'results.md').read_text()
    assert all(f'| {name} |' in table for name in toy2d.NAMES)
