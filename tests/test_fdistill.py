"""Tests of fdistill.py, each against an independent truth: the paper's Table 1 and Theorem 1 (by autograd,
quadrature and finite differences), Di-Bregman's Table 1, DMD2's own loss formula, closed forms."""

import math
import os
import subprocess
import sys

import pytest
import scipy.integrate
import torch
import torch.nn.functional as F

import fdistill
import sd_unet

SIX = ['rkl', 'srkl', 'js', 'hellinger', 'fkl', 'jeffreys']
f64 = torch.float64

#----------------------------------------------------------------------------
# Table 1 of the f-distill paper, transcribed here independently of fdistill.py: name -> (f, h, mode-seeking).

TABLE1 = {
    'rkl':       (lambda r: -torch.log(r),                                       lambda r: torch.ones_like(r), 'yes'),
    'srkl':      (lambda r: (r + 1) * torch.log(1 / 2 + 1 / (2 * r)),            lambda r: 1 / (r + 1),        'yes'),
    'js':        (lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2), lambda r: r / (r + 1),        'medium'),
    'hellinger': (lambda r: 1 - r ** 0.5,                                        lambda r: r ** 0.5 / 4,       'medium'),
    'fkl':       (lambda r: r * torch.log(r),                                    lambda r: r,                  'no'),
    'jeffreys':  (lambda r: (r - 1) * torch.log(r),                              lambda r: r + 1,              'no'),
}

def second_derivative(fn, r):
    r = r.detach().requires_grad_(True)
    d1, = torch.autograd.grad(fn(r).sum(), r, create_graph=True)    # fn acts elementwise, so sum() is safe
    d2, = torch.autograd.grad(d1.sum(), r)
    return d2

R_GRID = torch.logspace(-3, 3, 601, dtype=f64)

@pytest.mark.parametrize('name', SIX)
def test_divergence_matches_table1(name):
    f, h, mode_seeking = TABLE1[name]
    div = fdistill.divergence(name)
    torch.testing.assert_close(div.f(R_GRID), f(R_GRID), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(div.h(R_GRID), h(R_GRID), rtol=1e-12, atol=0)
    assert div.mode_seeking == mode_seeking

# Theorem 1 defines h(r) := f''(r) r^2.
@pytest.mark.parametrize('name', SIX)
def test_h_is_f_second_derivative_times_r_squared(name):
    div = fdistill.divergence(name)
    torch.testing.assert_close(div.h(R_GRID), second_derivative(div.f, R_GRID) * R_GRID ** 2, rtol=1e-7, atol=1e-12)

# An f-divergence needs f convex on (0, inf) with f(1) = 0 (Sec. 2).
@pytest.mark.parametrize('name', SIX)
def test_f_is_convex_and_vanishes_at_one(name):
    div = fdistill.divergence(name)
    assert abs(div.f(torch.ones([], dtype=f64)).item()) < 1e-15
    assert (second_derivative(div.f, R_GRID) >= 0).all()
    gen = torch.Generator().manual_seed(1)
    a, b = 10 ** (6 * torch.rand(2, 10000, generator=gen, dtype=f64) - 3)   # log-uniform pairs in [1e-3, 1e3]
    mid, chord = div.f((a + b) / 2), (div.f(a) + div.f(b)) / 2
    assert (mid <= chord + 1e-12 * (1 + chord.abs())).all()

#----------------------------------------------------------------------------
# Di-Bregman (Zhu et al. 2025) Table 1 generators h_B; Theorem 3.1 weights the score difference by
# h_B''(r_B) r_B with r_B = q/p = 1/r. Where that weight equals an f-distill h, the two methods coincide.

BREGMAN = {
    'LR': (lambda r: r * torch.log(r) - (1 + r) * torch.log(1 + r), 'js'),
    'KL': (lambda r: r * torch.log(r) - r,                            'rkl'),
    'BE': (lambda r: -torch.log(r),                                    'fkl'),
    'LS': (lambda r: r ** 2 / 2,                                       'sba:1'),
}

def bregman_weight(h_B, r):
    r_B = 1 / r
    return second_derivative(h_B, r_B) * r_B

@pytest.mark.parametrize('bregman', list(BREGMAN))
def test_bregman_choice_coincides_with_fdistill_row(bregman):
    h_B, name = BREGMAN[bregman]
    torch.testing.assert_close(fdistill.divergence(name).h(R_GRID), bregman_weight(h_B, R_GRID), rtol=1e-7, atol=1e-12)

@pytest.mark.parametrize('lam', [0.5, 3, 5, -0.5])
def test_sba_weight_matches_bregman_generator(lam):
    h_B = lambda r: (r ** (1 + lam) - r) / (lam * (lam + 1))   # Di-Bregman Table 1, SBA
    torch.testing.assert_close(fdistill.divergence(f'sba:{lam}').h(R_GRID), bregman_weight(h_B, R_GRID), rtol=1e-7, atol=1e-12)

# The limits lambda -> 0 and lambda -> -1 of SBA are KL and BE, i.e. reverse-KL and forward-KL.
def test_sba_limits_are_reverse_and_forward_kl():
    torch.testing.assert_close(fdistill.divergence('sba:0').h(R_GRID), fdistill.divergence('rkl').h(R_GRID), rtol=1e-12, atol=0)
    torch.testing.assert_close(fdistill.divergence('sba:-1').h(R_GRID), fdistill.divergence('fkl').h(R_GRID), rtol=1e-12, atol=0)

# D_f depends on f only through h, up to scale: SBA(-0.5) has h = r^0.5 = 4 x squared Hellinger's h, so it is
# the same divergence (times 4) and belongs in Table 1's 'medium' row, as SBA(0) belongs with reverse-KL and
# SBA(-1) with forward-KL.
def test_sba_mode_seeking_label_agrees_with_table1_row_of_same_h():
    for lam, name in [(0, 'rkl'), (-1, 'fkl'), (-0.5, 'hellinger')]:
        assert fdistill.divergence(f'sba:{lam}').mode_seeking == TABLE1[name][2], (lam, name)

def test_unknown_divergence_names_raise_helpful_errors():
    with pytest.raises(ValueError) as info:
        fdistill.divergence('kl')
    assert all(name in str(info.value) for name in SIX + ['sba:'])
    with pytest.raises(ValueError, match=r'sba:x.*number'):
        fdistill.divergence('sba:x')

#----------------------------------------------------------------------------
# Theorem 1 in 1-D: teacher p = N(0, 1), generator G(z) = theta1 + theta2 z, so p_t = N(0, 1 + sigma^2) and
# q_t = N(theta1, theta2^2 + sigma^2). The derivative of D_f(p_t || q_t) = int q_t f(p_t / q_t) dx by
# quadrature + central differences must equal the Monte-Carlo gradient of fdistill_loss built from exact
# scores and exact ratios. q_t is wider than p_t, so r is bounded and every estimator has finite variance.

SIGMA, THETA = 0.5, (0.4, 1.3)

def gaussian_logpdf(x, mean, var):
    return -0.5 * (x - mean) ** 2 / var - 0.5 * math.log(2 * math.pi * var)

def divergence_by_quadrature(f, theta):
    var_p, mean_q, var_q = 1 + SIGMA ** 2, theta[0], theta[1] ** 2 + SIGMA ** 2
    def integrand(x):
        log_p, log_q = gaussian_logpdf(x, 0, var_p), gaussian_logpdf(x, mean_q, var_q)
        return math.exp(log_q) * f(torch.tensor(math.exp(log_p - log_q), dtype=f64)).item()
    return scipy.integrate.quad(integrand, -30, 30, epsabs=1e-13, epsrel=1e-12, limit=200)[0]

def gradient_by_quadrature(f, step=1e-4):
    grad = []
    for i in range(2):
        hi, lo = list(THETA), list(THETA)
        hi[i] += step
        lo[i] -= step
        grad.append((divergence_by_quadrature(f, hi) - divergence_by_quadrature(f, lo)) / (2 * step))
    return torch.tensor(grad, dtype=f64)

@pytest.fixture(scope='module')
def theorem1_samples():
    gen = torch.Generator().manual_seed(0)
    z, eps = torch.randn(2, 2_000_000, generator=gen, dtype=f64)
    return z, eps

@pytest.mark.parametrize('name', SIX)
def test_theorem1_gradient_matches_quadrature(name, theorem1_samples):
    z, eps = theorem1_samples
    var_p, var_q = 1 + SIGMA ** 2, THETA[1] ** 2 + SIGMA ** 2
    theta = torch.tensor(THETA, dtype=f64, requires_grad=True)
    y = theta[0] + theta[1] * z                                    # G_theta(z)
    x = (y + SIGMA * eps).detach()                                 # x = G(z) + sigma eps
    s_p, s_q = -x / var_p, -(x - THETA[0]) / var_q                 # exact scores of p_t and q_t
    D_teacher, D_fake = x + SIGMA ** 2 * s_p, x + SIGMA ** 2 * s_q  # EDM Eq. 3 inverted
    r = torch.exp(gaussian_logpdf(x, 0, var_p) - gaussian_logpdf(x, THETA[0], var_q))
    h = fdistill.divergence(name).h(r)
    # grad = w h (D_fake - D_teacher) = -w sigma^2 h (s_p - s_q); w = 1/sigma^2 leaves Theorem 1's integrand, and
    # the loss's 1/y.numel() turns the sum over samples into the Monte-Carlo mean.
    loss = fdistill.fdistill_loss(y, D_teacher, D_fake, h, w=torch.tensor(1 / SIGMA ** 2, dtype=f64))
    grad_mc, = torch.autograd.grad(loss, theta)
    per_sample = -(h * (s_p - s_q))[:, None] * torch.stack([torch.ones_like(z), z], 1)   # Eq. 3 integrand
    se = per_sample.std(0) / math.sqrt(len(z))
    grad_quad = gradient_by_quadrature(TABLE1[name][0])
    assert grad_quad.abs().max() > 30 * se.max(), 'test too weak: Monte-Carlo error comparable to the gradient'
    assert ((grad_mc - grad_quad).abs() < 5 * se + 1e-7).all(), (grad_mc, grad_quad, se)

#----------------------------------------------------------------------------
# The surrogate loss (Eq. 4) in denoiser form: its gradient w.r.t. the generator output y is
# -w h (s_p - s_q) sigma^2 / y.numel() with DMD's w = 1 / mean|y - D_teacher| per sample; with h = 1 it is DMD2.

def surrogate_inputs(B=4, shape=(3, 5, 5)):
    gen = torch.Generator().manual_seed(2)
    y = torch.randn(B, *shape, generator=gen)
    D_teacher, D_fake, noise = torch.randn(3, B, *shape, generator=gen)
    sigma = torch.tensor([0.01, 0.3, 2.0, 40.0])
    return y.requires_grad_(True), D_teacher, D_fake, noise, sigma

def dmd2_distribution_matching_loss(latents, pred_real_image, pred_fake_image):
    # tianweiy/DMD2 main/edm/edm_guidance.py, compute_distribution_matching_loss, as published
    p_real = latents - pred_real_image
    p_fake = latents - pred_fake_image
    weight_factor = torch.abs(p_real).mean(dim=[1, 2, 3], keepdim=True)
    grad = torch.nan_to_num((p_real - p_fake) / weight_factor)
    return 0.5 * F.mse_loss(latents, (latents - grad).detach(), reduction='mean')

def test_surrogate_gradient_is_weighted_score_difference():
    y, D_teacher, D_fake, noise, sigma = surrogate_inputs()
    h_bar = torch.tensor([0.2, 1.0, 1.3, 1.5])
    s4 = sigma.reshape(-1, 1, 1, 1)
    x_t = y.detach() + s4 * noise
    s_p, s_q = (D_teacher - x_t) / s4 ** 2, (D_fake - x_t) / s4 ** 2
    w = 1 / (y.detach() - D_teacher).abs().flatten(1).mean(1)
    expected = -(w * h_bar).reshape(-1, 1, 1, 1) * (s_p - s_q) * s4 ** 2 / y.numel()
    grad, = torch.autograd.grad(fdistill.fdistill_loss(y, D_teacher, D_fake, h_bar), y)
    torch.testing.assert_close(grad, expected, rtol=1e-4, atol=1e-8)

def test_surrogate_with_unit_h_is_dmd2():
    y, D_teacher, D_fake, _, _ = surrogate_inputs()
    loss = fdistill.fdistill_loss(y, D_teacher, D_fake, torch.ones(len(y)))
    loss_dmd2 = dmd2_distribution_matching_loss(y, D_teacher, D_fake)
    grad, = torch.autograd.grad(loss, y)
    grad_dmd2, = torch.autograd.grad(loss_dmd2, y)
    torch.testing.assert_close(loss, loss_dmd2, rtol=1e-6, atol=0)
    torch.testing.assert_close(grad, grad_dmd2, rtol=1e-5, atol=1e-9)

# Teacher classifier-free guidance (App. D.5) on denoisers is guidance on scores, since D = x + sigma^2 s:
# sd_unet.cfg_eps, the project's guidance (on eps-predictions), is affine, so it guides denoisers alike.
def cfg_denoiser(D_cond, D_uncond, scale):
    return sd_unet.cfg_eps(D_uncond, D_cond, scale)

def test_cfg_denoiser_is_guidance_on_scores():
    gen = torch.Generator().manual_seed(3)
    x, D_cond, D_uncond = torch.randn(3, 2, 3, 4, 4, generator=gen, dtype=f64)
    sigma = 0.7
    torch.testing.assert_close(cfg_denoiser(D_cond, D_uncond, 1.0), D_cond)
    torch.testing.assert_close(cfg_denoiser(D_cond, D_uncond, 0.0), D_uncond)
    score = lambda D: (D - x) / sigma ** 2
    guided = score(D_uncond) + 2.5 * (score(D_cond) - score(D_uncond))
    torch.testing.assert_close(score(cfg_denoiser(D_cond, D_uncond, 2.5)), guided)

#----------------------------------------------------------------------------
# Density ratio (Alg. 1 line 6) and the two-stage normalisation (Sec. 4, Alg. 1 lines 7-9).

R_MIN, R_MAX, NUM_BINS = 1e-2, 1e2, 10

def test_ratio_is_exp_logit_clipped():
    logits = torch.tensor([-1e4, -50, -5, -1, 0, 0.5, 4, 5, 50, 1e4])
    r = fdistill.ratio(logits, R_MIN, R_MAX)
    assert torch.isfinite(r).all() and r.dtype == torch.float32
    torch.testing.assert_close(r, logits.double().exp().clamp(R_MIN, R_MAX).float(), rtol=1e-6, atol=0)
    assert (r >= R_MIN * (1 - 1e-6)).all() and (r <= R_MAX * (1 + 1e-6)).all()
    assert torch.isfinite(fdistill.ratio(logits.half().clamp(-6e4, 6e4), R_MIN, R_MAX)).all()

# Bin membership written out independently: bin k holds edges[k-1] < sigma <= edges[k]. Which bin a sigma equal
# to an edge joins is a free convention, so tests of the weights use sigmas off the Karras levels (no ties).
def bin_index(sigma, edges):
    return (sigma[:, None] > edges[None, :]).sum(1)

def continuous_sigma(n, gen):
    return torch.empty(n).uniform_(math.log(0.005), math.log(79), generator=gen).exp()

def test_stage1_makes_mean_ratio_one_in_every_sigma_bin():
    gen = torch.Generator().manual_seed(4)
    edges = fdistill.sigma_bin_edges(fdistill.karras_sigmas(), NUM_BINS)
    sigma = continuous_sigma(4096, gen)
    r = fdistill.ratio(torch.randn(4096, generator=gen) * 1.5 + torch.log(sigma), R_MIN, R_MAX)  # bin means differ
    r_bar = fdistill.normalize_ratio(r, sigma, edges)
    idx = bin_index(sigma, edges)
    assert len(idx.unique()) == NUM_BINS
    for k in range(NUM_BINS):
        in_bin = idx == k
        assert abs(r_bar[in_bin].double().mean().item() - 1) < 1e-5
        scale = r_bar[in_bin] / r[in_bin]                                   # stage 1 only rescales each bin
        torch.testing.assert_close(scale, scale[0].expand_as(scale), rtol=1e-5, atol=0)

def test_stage2_makes_batch_mean_weight_one():
    h = torch.rand(1000, generator=torch.Generator().manual_seed(5)) ** 4 * 100
    h_bar = fdistill.normalize_weight(h)
    assert abs(h_bar.double().mean().item() - 1) < 1e-6
    torch.testing.assert_close(h_bar / h, (h.double().mean().reciprocal()).float().expand_as(h), rtol=1e-5, atol=0)

def weights_by_hand(logits, sigma, name, edges):
    r = logits.double().exp().clamp(R_MIN, R_MAX)
    idx = bin_index(sigma, edges)
    bin_mean = torch.stack([r[idx == k].mean() if (idx == k).any() else r.new_ones([]) for k in range(len(edges) + 1)])
    h = TABLE1[name][1](r / bin_mean[idx])
    return h / h.mean(), r

@pytest.mark.parametrize('name', SIX)
def test_weights_and_diagnostics(name):
    gen = torch.Generator().manual_seed(6)
    levels = fdistill.karras_sigmas()
    edges = fdistill.sigma_bin_edges(levels, NUM_BINS)
    sigma = continuous_sigma(512, gen)
    logits = torch.randn(512, generator=gen) * 2.5                      # about 7% beyond log(r_min), log(r_max)
    h_bar = fdistill.weights(logits, sigma, fdistill.divergence(name), R_MIN, R_MAX, edges)
    stats = fdistill.weight_stats(logits, h_bar, sigma, R_MIN, R_MAX, edges)
    expected, r = weights_by_hand(logits, sigma, name, edges)
    torch.testing.assert_close(h_bar.double(), expected, rtol=1e-5, atol=1e-7)
    clipped = ((logits <= math.log(R_MIN)) | (logits >= math.log(R_MAX))).double().mean().item()
    assert clipped > 0.02 and stats['r_clipped'] == pytest.approx(clipped, abs=1e-12)
    assert stats['h_ess'] == pytest.approx((expected.sum() ** 2 / (len(expected) * expected.square().sum())).item(), rel=1e-5)
    assert stats['h_mean'] == pytest.approx(1, rel=1e-6)
    assert stats['r_mean'] == pytest.approx(r.mean().item(), rel=1e-5)
    assert stats['r_min'] == pytest.approx(R_MIN, rel=1e-5) and stats['r_max'] == pytest.approx(R_MAX, rel=1e-5)
    assert stats['h_min'] == pytest.approx(expected.min().item(), rel=1e-5, abs=1e-7)
    assert stats['h_max'] == pytest.approx(expected.max().item(), rel=1e-5)
    idx = bin_index(sigma, edges)                                       # spread of h_bar within each sigma bin
    for k in range(NUM_BINS):
        assert stats[f'h_std_bin{k}'] == pytest.approx(expected[idx == k].std(unbiased=False).item(), rel=1e-5, abs=1e-7)
    assert (max(stats[f'h_std_bin{k}'] for k in range(NUM_BINS)) == 0) == (name == 'rkl')

# Karras levels crowd near sigma_min, so stage-1 bins cut at equal steps of the level index. The contrast:
# 10 equal-width bins over [0.002, 80] put about 65% of the sampled sigmas into the lowest bin (0.003..8),
# mixing noise levels 2500x apart in one stage-1 mean.
def test_sigma_bins_receive_equal_shares():
    levels = fdistill.karras_sigmas()
    sigma = fdistill.sample_sigma(levels, 100_000, generator=torch.Generator().manual_seed(7))
    share = torch.bincount(bin_index(sigma, fdistill.sigma_bin_edges(levels, NUM_BINS)), minlength=NUM_BINS) / len(sigma)
    assert len(share) == NUM_BINS and ((share - 1 / NUM_BINS).abs() < 0.2 / NUM_BINS).all(), share
    linear_edges = torch.linspace(0.002, 80, NUM_BINS + 1)[1:-1]
    linear_share = torch.bincount(bin_index(sigma, linear_edges), minlength=NUM_BINS) / len(sigma)
    assert linear_share[0] > 0.6 and linear_share[0] == linear_share.max()
    assert sigma.min() >= levels[20].float() and sigma.max() <= levels[979].float()   # DMD2's 2%..98% of levels

#----------------------------------------------------------------------------
# DDP: the normalisation statistics are all-reduced, so 2 processes with half a batch each give exactly the
# weights of 1 process on the whole batch. The halves differ in distribution, so local means would not do.

def test_ddp_weights_match_one_process(tmp_path):
    gen = torch.Generator().manual_seed(8)
    levels = fdistill.karras_sigmas()
    batch = dict(f='fkl', r_min=R_MIN, r_max=R_MAX, edges=fdistill.sigma_bin_edges(levels, NUM_BINS),
                 sigma=fdistill.sample_sigma(levels, 256, generator=gen),
                 logits=torch.cat([torch.randn(128, generator=gen), torch.randn(128, generator=gen) * 3 + 1]))
    torch.save(batch, tmp_path / 'batch.pt')
    worker = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'ddp_weights_worker.py')
    procs = [subprocess.Popen([sys.executable, worker, str(rank), '2', str(tmp_path / 'rendezvous'), str(tmp_path / 'batch.pt'),
                               str(tmp_path / f'rank{rank}.pt')], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(2)]
    try:
        outputs = [proc.communicate(timeout=120)[0] for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    ranks = [torch.load(tmp_path / f'rank{rank}.pt', weights_only=True) for rank in range(2)]
    div = fdistill.divergence('fkl')
    h_bar = fdistill.weights(batch['logits'], batch['sigma'], div, R_MIN, R_MAX, batch['edges'])
    stats = fdistill.weight_stats(batch['logits'], h_bar, batch['sigma'], R_MIN, R_MAX, batch['edges'])
    # h_bar: float64 bin and batch sums, rounded to float32 twice, so a few ulp (1.2e-7 each) apart at most.
    torch.testing.assert_close(torch.cat([out['h_bar'] for out in ranks]), h_bar, rtol=1e-6, atol=0)
    # The diagnostics sum r and h_bar in float32 before the float64 all-reduce: 256 positive terms in another
    # order differ by at most 255 * 6e-8 = 1.5e-5 relative.
    for out in ranks:
        assert out['stats'] == pytest.approx(stats, rel=3e-5)
    h_local = fdistill.weights(batch['logits'][:128], batch['sigma'][:128], div, R_MIN, R_MAX, batch['edges'])
    assert (h_local - h_bar[:128]).abs().max() > 0.05, 'halves too alike: a missing all-reduce would go unnoticed'

#----------------------------------------------------------------------------
# Fake-score DSM, GAN losses, R1, the discriminator head.

def test_fake_score_loss_is_edm_weighted_dsm():
    gen = torch.Generator().manual_seed(9)
    y, noise = torch.randn(2, 6, 2, 4, 4, generator=gen, dtype=f64)
    sigma = torch.tensor([0.002, 0.05, 0.5, 1.0, 10.0, 80.0], dtype=f64)
    fake_score = lambda x, s: torch.tanh(x) / (1 + s ** 2)
    s4 = sigma.reshape(-1, 1, 1, 1)
    # DMD2's compute_loss_fake weighting: snr + 1 / sigma_data^2 = EDM's lambda(sigma).
    expected = ((s4 ** -2 + 1 / 0.5 ** 2) * (fake_score(y + s4 * noise, s4) - y) ** 2).mean()
    torch.testing.assert_close(fdistill.fake_score_loss(fake_score, y, sigma, noise).double(), expected, rtol=1e-6, atol=0)

# DSM's minimiser is the posterior mean: for y ~ N(0, s^2) the best linear denoiser is D(x) = x s^2 / (s^2 + sigma^2).
def test_fake_score_loss_is_minimised_by_posterior_mean():
    gen = torch.Generator().manual_seed(10)
    s, sigma = 0.5, torch.full([200_000], 0.7, dtype=f64)
    y, noise = torch.randn(2, 200_000, 1, generator=gen, dtype=f64)
    a = torch.zeros([], dtype=f64, requires_grad=True)
    g0, = torch.autograd.grad(fdistill.fake_score_loss(lambda x, _: a * x, s * y, sigma, noise), a)
    a = torch.ones([], dtype=f64, requires_grad=True)
    g1, = torch.autograd.grad(fdistill.fake_score_loss(lambda x, _: a * x, s * y, sigma, noise), a)
    a_best = -g0 / (g1 - g0)                                  # the loss is quadratic in a
    assert a_best.item() == pytest.approx(s ** 2 / (s ** 2 + 0.7 ** 2), rel=0.01)

def test_gan_losses_are_non_saturating_log_likelihoods():
    gen = torch.Generator().manual_seed(11)
    l_real, l_fake = torch.randn(2, 64, generator=gen, dtype=f64) * 3
    expected_d = -torch.log(torch.sigmoid(l_real)).mean() - torch.log(1 - torch.sigmoid(l_fake)).mean()
    torch.testing.assert_close(fdistill.gan_discriminator_loss(l_real, l_fake), expected_d.float())
    torch.testing.assert_close(fdistill.gan_generator_loss(l_fake), (-torch.log(torch.sigmoid(l_fake)).mean()).float())
    # stable where sigmoid saturates: -log sigmoid(-100) = 100
    assert fdistill.gan_generator_loss(torch.tensor([-100.0])).item() == pytest.approx(100)
    assert fdistill.gan_discriminator_loss(torch.tensor([-100.0]), torch.tensor([100.0])).item() == pytest.approx(200)

def test_r1_penalty_of_linear_and_quadratic_logits():
    gen = torch.Generator().manual_seed(12)
    a = torch.randn(3, 4, 4, generator=gen, dtype=f64, requires_grad=True)
    x = torch.randn(5, 3, 4, 4, generator=gen, dtype=f64, requires_grad=True)
    r1 = fdistill.r1_penalty((x * a).flatten(1).sum(1), x)        # grad_x (a . x) = a
    assert r1.item() == pytest.approx(a.square().sum().item(), rel=1e-6)
    grad_a, = torch.autograd.grad(r1, a)                            # create_graph: d||a||^2/da = 2a reaches the weights
    torch.testing.assert_close(grad_a.double(), 2 * a.detach(), rtol=1e-6, atol=1e-7)
    r1 = fdistill.r1_penalty(0.5 * x.square().flatten(1).sum(1), x)  # grad_x (|x|^2 / 2) = x
    assert r1.item() == pytest.approx(x.detach().square().flatten(1).sum(1).mean().item(), rel=1e-6)

def test_discriminator_head_averages_one_logit_per_resolution():
    gen = torch.Generator().manual_seed(13)
    channels, resolutions = [4, 8, 16], [32, 16, 8]
    head = fdistill.DiscriminatorHead(channels, resolutions)
    features = [torch.randn(3, c, res, res, generator=gen) for c, res in zip(channels, resolutions)]
    logits = head(features)
    assert logits.shape == (3,)
    singles = []
    for i, (c, res) in enumerate(zip(channels, resolutions)):
        single = fdistill.DiscriminatorHead([c], [res])
        single.branches[0].load_state_dict(head.branches[i].state_dict())
        singles.append(single([features[i]]))
    torch.testing.assert_close(logits, torch.stack(singles).mean(0))
    # per-sample: GroupNorm, not BatchNorm, so one sample's logit does not depend on the rest of the batch
    torch.testing.assert_close(head([f[:1] for f in features]), logits[:1])
    assert fdistill.DiscriminatorHead([6], [1])([torch.randn(3, 6, 1, 1, generator=gen)]).shape == (3,)

# The ImageNet-64 head on the 768-channel 8x8 bottleneck has the layer shapes of DMD2's cls_pred_branch.
def test_discriminator_head_on_8x8_has_dmd2_layer_shapes():
    head = fdistill.DiscriminatorHead([768], [8])
    dmd2 = [(768, 768, 4, 4), (768,), (768,), (768,), (768, 768, 4, 4), (768,), (768,), (768,), (1, 768, 1, 1), (1,)]
    assert [tuple(p.shape) for p in head.parameters()] == dmd2
    assert [m.num_groups for m in head.modules() if isinstance(m, torch.nn.GroupNorm)] == [32, 32]

# Under bf16 autocast (the teacher's features arrive in bf16) the head still computes its logits in fp32, so
# r = exp(logit) keeps fp32 resolution: the same numbers as the head run without autocast on the upcast features
# (bitwise: the same fp32 operations on the same inputs), and gradients reach the bf16 features.
def test_discriminator_head_logits_are_fp32_under_bf16_autocast():
    gen = torch.Generator().manual_seed(15)
    head = fdistill.DiscriminatorHead([16, 8], [8, 4])
    features = [torch.randn(5, c, res, res, generator=gen).bfloat16().requires_grad_(True) for c, res in [(16, 8), (8, 4)]]
    with torch.autocast('cpu', dtype=torch.bfloat16):
        logits = head(features)
        r = fdistill.ratio(logits, 1e-2, 1e2)
    assert logits.dtype == torch.float32 and r.dtype == torch.float32
    reference = head([f.detach().float() for f in features])
    assert torch.equal(logits, reference)
    logits.sum().backward()
    assert all(f.grad is not None and f.grad.dtype == torch.bfloat16 and f.grad.abs().sum() > 0 for f in features)

#----------------------------------------------------------------------------
# One generator step and one critic step (Alg. 1) with tiny networks.

class TinyTeacher(torch.nn.Module):     # EDM-style denoiser returning (D_x, [8x8 features])
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Conv2d(2, 8, 3, padding=1)
        self.dec = torch.nn.Conv2d(8, 2, 1)

    def forward(self, x, sigma):
        features = torch.tanh(self.enc(x / (1 + sigma ** 2).sqrt()))
        return x / (1 + sigma ** 2) + 0.3 * self.dec(features), [features]

def tiny_setup():
    torch.manual_seed(14)
    generator = torch.nn.Sequential(torch.nn.Linear(4, 2 * 8 * 8), torch.nn.Unflatten(1, (2, 8, 8)))
    teacher = TinyTeacher().requires_grad_(False)
    fake = TinyTeacher()
    fake_score = lambda x, sigma: fake(x, sigma)[0]
    head = fdistill.DiscriminatorHead([8], [8])
    levels = fdistill.karras_sigmas()
    edges = fdistill.sigma_bin_edges(levels, 4)
    B = 6
    z, noise = torch.randn(B, 4), torch.randn(B, 2, 8, 8)
    sigma = continuous_sigma(B, None)
    return generator, teacher, fake, fake_score, head, edges, z, noise, sigma

@pytest.mark.parametrize('name', ['rkl', 'js'])
def test_generator_loss_is_dmd2_times_weight_plus_gan(name):
    generator, teacher, fake, fake_score, head, edges, z, noise, sigma = tiny_setup()
    head.requires_grad_(False)              # the loop freezes the head for the generator step
    w_gan = 0.03
    loss, stats = fdistill.generator_loss(y=generator(z), draws=fdistill.GeneratorNoise(sigma, noise), teacher=teacher, fake_score=fake_score,
                                          head=head, div=fdistill.divergence(name), ratio_norm=fdistill.RatioNorm(R_MIN, R_MAX, edges), w_gan=w_gan)
    grads = torch.autograd.grad(loss, list(generator.parameters()))
    # independent: DMD2's loss (rkl, h = 1) or DMD2's per-sample gradient times h_bar from Table 1's h (js),
    # plus the non-saturating GAN term through the teacher's features
    y = generator(z)
    s4 = sigma.reshape(-1, 1, 1, 1)
    x_t = y + s4 * noise
    D_teacher, features = teacher(x_t, s4)
    D_teacher, D_fake, logits = D_teacher.detach(), fake_score(x_t, s4).detach(), head(features)
    if name == 'rkl':
        loss_dm = dmd2_distribution_matching_loss(y, D_teacher, D_fake)
    else:
        h_bar = weights_by_hand(logits.detach(), sigma, name, edges)[0].float().reshape(-1, 1, 1, 1)
        p_real, p_fake = (y - D_teacher).detach(), (y - D_fake).detach()
        grad = h_bar * (p_real - p_fake) / p_real.abs().mean(dim=[1, 2, 3], keepdim=True)
        loss_dm = 0.5 * F.mse_loss(y, (y - grad).detach())
    expected = loss_dm + w_gan * F.softplus(-logits).mean()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-7)
    for g, g_expected in zip(grads, torch.autograd.grad(expected, list(generator.parameters()))):
        torch.testing.assert_close(g, g_expected, rtol=1e-4, atol=1e-7)
    assert stats['h_mean'] == pytest.approx(1, rel=1e-6)

# The generator step must not train the critics: the fake score never gets a gradient; the head would
# (through the GAN term), so the training loop has to freeze its parameters for the generator step.
def test_generator_loss_reaches_head_only_when_not_frozen():
    generator, teacher, fake, fake_score, head, edges, z, noise, sigma = tiny_setup()
    args = dict(draws=fdistill.GeneratorNoise(sigma, noise), teacher=teacher, fake_score=fake_score, head=head,
                div=fdistill.divergence('js'), ratio_norm=fdistill.RatioNorm(R_MIN, R_MAX, edges), w_gan=0.03)
    fdistill.generator_loss(y=generator(z), **args)[0].backward()
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in fake.parameters())
    head.zero_grad(set_to_none=True)
    head.requires_grad_(False)
    fdistill.generator_loss(y=generator(z), **args)[0].backward()
    assert all(p.grad is None for p in head.parameters())
    assert all(p.grad is not None for p in generator.parameters())

def test_critic_loss_trains_critics_not_generator():
    generator, teacher, fake, fake_score, head, edges, z, noise, sigma = tiny_setup()
    gen = torch.Generator().manual_seed(15)
    x_real, noise_dsm, noise_fake, noise_real = torch.randn(4, 6, 2, 8, 8, generator=gen)
    sigma_dsm, sigma_gan = torch.rand(2, 6, generator=gen) * 2 + 0.01
    gamma = 0.5
    y = generator(z)
    loss, stats = fdistill.critic_loss(y=y, x_real=x_real, draws=fdistill.CriticNoise(sigma_dsm, noise_dsm, sigma_gan, noise_fake, noise_real),
                                       teacher=teacher, fake_score=fake_score, head=head, gamma=gamma, edges=edges)
    loss.backward()
    assert y.grad_fn is not None and all(p.grad is None for p in generator.parameters())
    assert all(p.grad is not None for p in fake.parameters()) and all(p.grad is not None for p in head.parameters())
    # the value, by hand: DSM + GAN discriminator loss + gamma/2 R1 on the noised real inputs
    s4, g4 = sigma_dsm.reshape(-1, 1, 1, 1), sigma_gan.reshape(-1, 1, 1, 1)
    with torch.no_grad():
        dsm = ((s4 ** -2 + 4) * (fake_score(y + s4 * noise_dsm, s4) - y) ** 2).mean()
        logits_fake = head(teacher(y + g4 * noise_fake, g4)[1])
    x_real_t = (x_real + g4 * noise_real).requires_grad_(True)
    logits_real = head(teacher(x_real_t, g4)[1])
    grad_x, = torch.autograd.grad(logits_real.sum(), x_real_t)
    r1 = grad_x.square().flatten(1).sum(1).mean()
    expected = dsm + F.softplus(-logits_real).mean() + F.softplus(logits_fake).mean() + gamma / 2 * r1
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert stats['loss_r1'] == pytest.approx(r1.item(), rel=1e-5)
    correct = torch.cat([logits_real > 0, logits_fake < 0]).double()    # the head's accuracy on this very batch
    assert stats['disc_acc'] == pytest.approx(correct.mean().item(), abs=1e-12)
    idx = bin_index(sigma_gan, edges).repeat(2)
    for k in range(4):
        assert stats.get(f'disc_acc_bin{k}') == (pytest.approx(correct[idx == k].mean().item(), abs=1e-12) if (idx == k).any() else None)

# Per-bin accuracy against counts by hand; bins without samples are left out, so stats.jsonl stays finite.
def test_discriminator_bins_by_hand():
    gen = torch.Generator().manual_seed(16)
    edges = torch.tensor([0.1, 1.0, 10.0])
    sigma = torch.cat([torch.full([40], 0.05), torch.full([60], 5.0)])           # bins 0 and 2 only
    logits_real, logits_fake = torch.randn(2, 100, generator=gen) + torch.tensor([[0.0], [-2.0]])
    stats = fdistill.discriminator_bins(logits_real, logits_fake, sigma, edges)
    assert sorted(stats) == ['disc_acc', 'disc_acc_bin0', 'disc_acc_bin2']
    for k, part in ((0, slice(0, 40)), (2, slice(40, 100))):
        hits = (logits_real[part] > 0).sum() + (logits_fake[part] < 0).sum()
        assert stats[f'disc_acc_bin{k}'] == pytest.approx(hits.item() / (2 * len(sigma[part])), abs=1e-12)
    assert stats['disc_acc'] == pytest.approx(((logits_real > 0).sum() + (logits_fake < 0).sum()).item() / 200, abs=1e-12)

#----------------------------------------------------------------------------
