"""The paper's 2-D evidence for f-distill, on a laptop CPU.

Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching", 2025.
  f_and_h.png        |f'(r)| and h(r) of the six divergences (Fig. 3).
  variance.png       normalised variance of h for two unit Gaussians as their means part (Fig. 4a).
  score_weight.png   score difference and forward-KL's h over the plane (Fig. 2).
  fig8.png           the skewed start, and where reverse-KL, JS and forward-KL take it, with h over the plane (Fig. 8).
  mode_coverage.png  the full Algorithm 1 from a skewed start, all six divergences, one row per setting.
  learning_curves.png  modes covered, TV and off-mode against generator steps (mean ± std over seeds).
  results.json, results.md  the numbers behind the figures (mean and spread over seeds).
Each setting's runs (all divergences x seeds) train as one batched model; its results and figures are
written as soon as it finishes.

  python toy2d.py                       # two settings of 30 runs, one process each: see the README for its time
  python toy2d.py --quick --outdir /tmp/toy   # reduced, well under a minute
"""

import argparse
import copy
import json
import math
import multiprocessing
import os
import time

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import numpy as np
import scipy.integrate
import torch

import fdistill
import rundir

NAMES = ['rkl', 'srkl', 'js', 'hellinger', 'fkl', 'jeffreys']    # Table 1, most to least mode-seeking
COLORS = dict(rkl='tab:blue', srkl='tab:cyan', js='tab:green', hellinger='tab:olive', fkl='tab:red', jeffreys='tab:purple')

#----------------------------------------------------------------------------
# Fig. 3: |f'(r)| (by autograd of Table 1's f) and h(r) against log r.

def f_prime(div, r):
    r = r.detach().double().requires_grad_(True)
    grad, = torch.autograd.grad(div.f(r).sum(), r)
    return grad

def plot_f_and_h(path):
    r = torch.linspace(-3, 3, 301, dtype=torch.float64).exp()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for name in NAMES:
        div = fdistill.divergence(name)
        axes[0].plot(r.log(), f_prime(div, r).abs(), color=COLORS[name], label=div.name)
        axes[1].plot(r.log(), div.h(r), color=COLORS[name], label=div.name)
    axes[0].set_ylim(1e-2, 30)      # |f'| touches 0 where f' changes sign (fkl at r = 1/e, js and Jeffreys at r = 1)
    for ax, title in zip(axes, ["(a) |f'(r)|", '(b) h(r) = f\'\'(r) r$^2$']):
        ax.set_yscale('log')
        ax.set_xlabel('log r')
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

#----------------------------------------------------------------------------
# Fig. 4a: Var_q(h(r)) / E_q[h(r)]^2 for q = N(0,1), p = N(mu,1), r = p/q = exp(mu x - mu^2/2).
# Closed forms from E_q[r^a] = exp(a(a-1) mu^2 / 2): E_q[r] = 1, E_q[r^2] = exp(mu^2), E_q[sqrt r] = exp(-mu^2/8).

CLOSED_FORMS = {
    'rkl':       lambda mu: 0 * mu,                             # h = 1 is constant
    'fkl':       lambda mu: np.expm1(mu ** 2),                  # Var(r) / 1
    'jeffreys':  lambda mu: np.expm1(mu ** 2) / 4,              # Var(r + 1) / 2^2
    'hellinger': lambda mu: np.expm1(mu ** 2 / 4),              # E[r] / E[sqrt r]^2 - 1
}

# Quadrature over x of E_q[h] and E_q[h^2], with h from fdistill's table. The integrand of E_q[h^2]
# for h = r peaks at x = 2 mu, so the interval reaches well past it.
def normalized_variance_quadrature(name, mu):
    h = fdistill.divergence(name).h
    def moments(x):
        r = torch.tensor(mu * x - mu ** 2 / 2, dtype=torch.float64).exp()
        hx = float(h(r))
        q = math.exp(-x ** 2 / 2) / math.sqrt(2 * math.pi)
        return np.array([q * hx, q * hx ** 2])
    m, _ = scipy.integrate.quad_vec(moments, -12, 12 + 2 * abs(mu), epsabs=0, epsrel=1e-10, points=[0, mu, 2 * mu])
    return max(m[1] / m[0] ** 2 - 1, 0.0)

def normalized_variance(name, mu):
    if name in CLOSED_FORMS:
        return float(CLOSED_FORMS[name](np.float64(mu)))
    return normalized_variance_quadrature(name, mu)

def plot_variance(path, table):
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name in NAMES:
        ax.plot(table['mu'], np.array(table[name]) + 1e-6, color=COLORS[name], label=fdistill.divergence(name).name)
    ax.set_yscale('log')
    ax.set_xlabel('mean difference $\\mu$ (q = N(0,1), p = N($\\mu$,1))')
    ax.set_ylabel('Var$_q$(h) / E$_q$[h]$^2$  (+1e-6)')
    ax.set_title('Normalised variance of h (Fig. 4a)')
    ax.grid(alpha=0.3)
    ax.legend(loc='upper left')
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

#----------------------------------------------------------------------------
# Isotropic Gaussian mixture sum_k pi_k N(mu_k, s^2 I) and its exact noised quantities:
# p_sigma = sum_k pi_k N(mu_k, (s^2 + sigma^2) I), and the denoiser E[x0 | x_sigma] (EDM Eq. 3:
# D(x; sigma) = x + sigma^2 grad log p_sigma(x)), a responsibility-weighted sum of per-component
# posterior means mu_k + s^2 / (s^2 + sigma^2) (x - mu_k).

class GaussianMixture:
    def __init__(self, means, weights, std):
        self.means = torch.as_tensor(means, dtype=torch.float32)        # [K, 2]
        self.weights = torch.as_tensor(weights, dtype=torch.float32)    # [K], sums to 1
        self.std = float(std)

    def log_joint(self, x, sigma):  # log pi_k N(x; mu_k, (s^2 + sigma^2) I), [B, K]
        var = self.std ** 2 + torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1) ** 2
        d2 = (x[:, None, :] - self.means.to(x.dtype)).square().sum(-1)
        return self.weights.to(x.dtype).log() - d2 / (2 * var) - torch.log(2 * math.pi * var)

    def log_prob(self, x, sigma=0.0):
        return self.log_joint(x, sigma).logsumexp(-1)

    def responsibilities(self, x, sigma):
        return self.log_joint(x, sigma).softmax(-1)

    def denoise(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        shrink = (self.std ** 2 / (self.std ** 2 + sigma ** 2))[:, :, None]            # [B, 1, 1]
        means = self.means.to(x.dtype)
        posterior_means = means + shrink * (x[:, None, :] - means)                     # [B, K, 2]
        return (self.responsibilities(x, sigma)[:, :, None] * posterior_means).sum(1)

    def score(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1)
        return (self.denoise(x, sigma) - x) / sigma ** 2

    def sample(self, n, generator=None):
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        return self.means[k] + self.std * torch.randn(n, 2, generator=generator)

def ring(num_modes=8, radius=2.0, std=0.2):
    angle = torch.arange(num_modes) * 2 * math.pi / num_modes
    return GaussianMixture(radius * torch.stack([angle.cos(), angle.sin()], 1), torch.full([num_modes], 1 / num_modes), std)

#----------------------------------------------------------------------------
# The teacher: exact mixture denoiser plus a frozen feature extractor for the discriminator
# (App. B: the discriminator is a small head on fixed teacher features). A real teacher's features
# know where the data are at each noise level; ours are (a) the mixture's posterior responsibilities
# gamma_k(x; sigma), which the exact denoiser computes anyway, and (b) fixed random Fourier features
# cos(W [c_in x, c_noise] + b) at several bandwidths, which let a one-hidden-layer head fit the smooth
# log-ratio log p_t/q_t of an arbitrary generator. Returned as one [B, C, 1, 1] map, so that
# fdistill.DiscriminatorHead(channels=[C], resolutions=[1]) sits on top.

class Teacher(torch.nn.Module):
    def __init__(self,
        mixture,                    # GaussianMixture: the data distribution p.
        sigma_data,                 # Data std, for EDM's c_in and c_noise.
        num_fourier     = 64,       # Random Fourier features.
        bandwidths      = (0.5, 1.5, 4.0),  # Frequency scales, one equal share of features each.
        seed            = 0,        # The extractor is fixed: the same seed gives the same teacher.
    ):
        super().__init__()
        self.mixture = mixture
        self.sigma_data = sigma_data
        g = torch.Generator().manual_seed(seed)
        scale = torch.tensor(bandwidths).repeat_interleave(math.ceil(num_fourier / len(bandwidths)))[:num_fourier]
        self.register_buffer('W', torch.randn(num_fourier, 3, generator=g) * scale[:, None])
        self.register_buffer('b', torch.rand(num_fourier, generator=g) * 2 * math.pi)
        self.channels = num_fourier + len(mixture.weights)

    def forward(self, x, sigma):
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(len(x), 1)
        c_in = 1 / (sigma ** 2 + self.sigma_data ** 2).sqrt()                      # EDM Table 1
        c_noise = sigma.log() / 4
        fourier = torch.cos(torch.cat([c_in * x, c_noise], 1) @ self.W.T + self.b)
        gamma = self.mixture.responsibilities(x, sigma)
        features = torch.cat([fourier * math.sqrt(2), gamma * math.sqrt(len(gamma[0]))], 1)
        return self.mixture.denoise(x, sigma), [features[:, :, None, None]]

#----------------------------------------------------------------------------
# Networks: an MLP, the fake score as an EDM-preconditioned denoiser D_psi(x; sigma) (EDM Table 1),
# and the one-step generator G_theta(z).

def mlp(dim_in, dim_out, hidden, depth, activation=torch.nn.SiLU):
    layers, dim = [], dim_in
    for _ in range(depth):
        layers += [torch.nn.Linear(dim, hidden), activation()]
        dim = hidden
    return torch.nn.Sequential(*layers, torch.nn.Linear(dim, dim_out))

class FakeScore(torch.nn.Module):
    def __init__(self,
        sigma_data,                 # Data std (EDM sigma_data).
        hidden      = 128,          # MLP width.
        depth       = 3,            # Hidden layers.
        num_freqs   = 8,            # Fourier embedding of c_noise.
    ):
        super().__init__()
        self.sigma_data = sigma_data
        self.register_buffer('freqs', 2 ** torch.arange(num_freqs, dtype=torch.float32) * 0.5)
        self.F = mlp(2 + 1 + 2 * num_freqs, 2, hidden, depth)

    def forward(self, x, sigma):    # EDM Eq. 7: D(x) = c_skip x + c_out F(c_in x, c_noise)
        sigma = torch.as_tensor(sigma, dtype=x.dtype).reshape(-1, 1).expand(len(x), 1)
        s2, d2 = sigma ** 2, self.sigma_data ** 2
        c_skip, c_out, c_in = d2 / (s2 + d2), sigma * self.sigma_data / (s2 + d2).sqrt(), 1 / (s2 + d2).sqrt()
        c_noise = sigma.log() / 4
        emb = c_noise * self.freqs
        return c_skip * x + c_out * self.F(torch.cat([c_in * x, c_noise, emb.sin(), emb.cos()], 1))

# ReLU, not SiLU: a continuous map of a Gaussian reaches 8 separate modes only through steep steps, and a
# piecewise-linear net forms them far sooner (regressed onto an 8-mode map for 1000 Adam steps, 38% of its
# samples still lay between modes, against 74% for the same SiLU net; docs/notebook.md).
def generator_net(hidden=128, depth=3):
    return mlp(2, 2, hidden, depth, torch.nn.ReLU)

#----------------------------------------------------------------------------
# Fig. 8's skewed start: the generator covers only modes 0 and 1, with weights 0.7 and 0.3.
# Target map for the regression: z_1's quantile picks the mode, and is re-stretched into a
# standard normal inside it, so the target is exactly the skewed two-mode mixture.

def skewed_target(z, mixture, first_weight=0.7):
    u = torch.special.ndtr(z[:, :1])
    second = u > first_weight
    u = torch.where(second, (u - first_weight) / (1 - first_weight), u / first_weight).clamp(1e-6, 1 - 1e-6)
    offset = mixture.std * torch.cat([torch.special.ndtri(u), z[:, 1:]], 1)
    return torch.where(second, mixture.means[1], mixture.means[0]) + offset

#----------------------------------------------------------------------------
# Metrics: a sample belongs to its nearest mode if within 3 std of it. Mode-occupancy histogram
# over the samples that belong to a mode; a mode is covered if it holds >= 20% of its true weight.

def mode_metrics(samples, mixture, radius=3.0, covered_fraction=0.2):
    d = torch.cdist(samples.float(), mixture.means)
    dist, k = d.min(1)
    on = dist < radius * mixture.std
    counts = torch.bincount(k[on], minlength=len(mixture.weights)).float()
    occupancy = counts / counts.sum().clamp(min=1)
    return dict(modes_covered=int((occupancy >= covered_fraction * mixture.weights).sum()),
                num_modes=len(mixture.weights),
                tv=float(0.5 * (occupancy - mixture.weights).abs().sum()),
                off_mode=float(1 - on.float().mean()),
                occupancy=occupancy.tolist())

#----------------------------------------------------------------------------
# The toy's recipe. The defaults are the documented run; --quick shrinks the step counts.
# The modes sit 2 sin(pi/8) radius / std = 30.6 std apart: near the start's modes {0, 1} the noised
# teacher and student agree until sigma is a sizeable part of the gap, so no low-noise level pulls a
# mode-seeking update towards the empty modes.

def toy_options(args):
    o = dict(
        num_modes       = 8,        # Modes on a circle...
        radius          = 2.0,      # ...of this radius,
        std             = 0.05,     # each with this std (neighbours 1.53 apart, 30.6 std).
        sigma_max       = args.sigma_max, # Karras levels over [0.002, sigma_max]: the data scale is ~1.4, not 80.
        num_levels      = 1000,     # Discretisation of the Karras schedule (DMD2).
        num_bins        = 4,        # Stage-1 sigma bins, equal shares of the sampled levels.
        batch           = 256,      # Batch size for every update.
        tau             = 5,        # Alg. 1 (TTUR): one generator update every tau iterations.
        steps           = args.steps, # Generator updates.
        lr_g            = 1e-3,     # Adam, generator, constant (as the image trainers; a cosine to 1e-5 fitted less, notebook).
        lr_critic       = 1e-3,     # Adam, fake score.
        lr_head         = args.lr_head, # Adam, discriminator head (Table 5: one lr for all networks).
        w_gan           = 0.0,      # GAN loss weight in the generator loss: set per setting (SETTINGS).
        weighting       = 'eps',    # Per-sigma weight w_t of Eq. (4): set per setting (generator_loss).
        gamma           = 0.0,      # R1 weight on noised real inputs (Table 5: 0 on ImageNet); it biases r at small sigma here.
        r_min           = args.r_min, # Ratio clip (Alg. 1 line 6).
        r_max           = args.r_max,
        head_hidden     = 64,       # Hidden channels of the discriminator head.
        pretrain_g      = 600,      # Regression steps of the generator onto the skewed start.
        pretrain_critic = 600,      # Fake-score and head steps on the skewed start.
        eval_samples    = 10000,    # Samples for the final metrics.
        history_samples = 2000,     # Samples for each learning-curve point...
        history_every   = max(args.steps // 20, 1),   # ...every this many generator steps.
    )
    if args.quick:
        o.update(pretrain_g=100, pretrain_critic=50, eval_samples=2000, batch=128)
    return o

# Every divergence runs every setting with the same options. main: the f-distill term alone (the
# paper's ablation, Table 10) with w_t = 1/sigma; with_gan: main plus the GAN term at the weight of
# the CIFAR-10 and SD presets (Table 5, --w-gan); dmd: main with DMD's per-sample normaliser as w_t.
SETTINGS = dict(main=dict(w_gan=0.0, weighting='eps'), with_gan=dict(w_gan=None, weighting='eps'), dmd=dict(w_gan=0.0, weighting='dmd'))

def setting_options(o, setting, w_gan):
    s = dict(SETTINGS[setting])
    s['w_gan'] = w_gan if s['w_gan'] is None else s['w_gan']
    return dict(o, setting=setting, **s)

def build(o):
    mixture = ring(o['num_modes'], o['radius'], o['std'])
    sigma_data = float((mixture.means.square().sum(1).mean() / 2 + mixture.std ** 2).sqrt())
    levels = fdistill.karras_sigmas(o['num_levels'], 0.002, o['sigma_max'])
    return mixture, sigma_data, Teacher(mixture, sigma_data), levels

#----------------------------------------------------------------------------
# Many runs as one model. Every divergence x seed of a setting trains at once: each network is an
# Ensemble of R independent copies (torch.func.vmap over stacked parameters), and every batch holds the
# R runs' samples interleaved, run r owning rows r, r + R, r + 2R, ... So a concatenation of such batches
# (critic_loss joins real and generated) keeps every row with its run, and fdistill's functions run on the
# whole batch unchanged. Adam is per element, so each copy trains exactly as it would alone.

class Ensemble(torch.nn.Module):
    def __init__(self, nets):
        super().__init__()
        params, buffers = torch.func.stack_module_state(nets)
        self.base = [copy.deepcopy(nets[0]).to('meta')]       # structure only; in a list, so not a submodule
        self.num_runs = len(nets)
        self.params = torch.nn.ParameterDict({k.replace('.', ':'): torch.nn.Parameter(v) for k, v in params.items()})
        for k, v in buffers.items():
            self.register_buffer(k.replace('.', ':'), v)

    def stacked(self):
        params = {k.replace(':', '.'): v for k, v in self.params.items()}
        return params, {k.replace(':', '.'): v for k, v in self.named_buffers()}

    def forward(self, *args):       # args: tensors, or lists of tensors, of R * n interleaved rows
        R = self.num_runs
        split = lambda x: x.reshape(-1, R, *x.shape[1:]).transpose(0, 1)
        merge = lambda x: x.transpose(0, 1).reshape(-1, *x.shape[2:])
        args = [[split(x) for x in a] if isinstance(a, list) else split(a) for a in args]
        call = lambda p, b, *a: torch.func.functional_call(self.base[0], (p, b), a)
        out = torch.func.vmap(call)(*self.stacked(), *args)
        return merge(out)

    def member(self, r):            # run r alone, as a plain callable sharing the parameters
        params, buffers = self.stacked()
        take = lambda d: {k: v[r] for k, v in d.items()}
        return lambda *args: torch.func.functional_call(self.base[0], (take(params), take(buffers)), args)

    def load_member(self, r, state):
        with torch.no_grad():
            for k, v in self.stacked()[0].items() | self.stacked()[1].items():
                v[r].copy_(state[k])

    def member_state(self, r):
        params, buffers = self.stacked()
        return {k: v[r].detach().clone() for k, v in (params | buffers).items()}

def runs_of(batch, num_runs):       # [R * n, ...] interleaved -> each run's [n, ...]
    return [batch[r::num_runs].contiguous() for r in range(num_runs)]

def critic_optimizer(fake_score, head, o):
    return torch.optim.Adam([dict(params=fake_score.parameters(), lr=o['lr_critic']), dict(params=head.parameters(), lr=o['lr_head'])])

# Alg. 1 lines 14-15 for every run at once: fdistill.critic_loss over the interleaved batch is the mean of
# the runs' own losses, so R times it gives each run the gradient of its own loss.
def critic_step(G, teacher, fake_score, head, opt, mixture, sigma_data, levels, *, o):
    n = o['batch'] * G.num_runs
    with torch.no_grad():
        y = G(torch.randn(n, 2))
    loss, stats = fdistill.critic_loss(y=y, x_real=mixture.sample(n),
        draws=fdistill.CriticNoise(fdistill.sample_sigma(levels, n), torch.randn(n, 2), fdistill.sample_sigma(levels, n), torch.randn(n, 2), torch.randn(n, 2)),
        teacher=teacher, fake_score=fake_score, head=head, gamma=o['gamma'], sigma_data=sigma_data)
    opt.zero_grad(set_to_none=True)
    (loss * G.num_runs).backward()
    opt.step()
    return stats

# Alg. 1 lines 6-12 for one run, with a choice of Eq. (4)'s per-sigma weight w_t.
# 'dmd' is fdistill.generator_loss itself: DMD's per-sample w = 1 / mean|y - D_teacher(x_t)|. It gives
# the levels with sigma above the ring's radius, where p_t and q_t are each one blob and the step can
# only move q's mean, a step as large as any other level's.
# 'eps' is w_t = 1/sigma: h * (eps_teacher - eps_fake), the epsilon-prediction difference of SDS/VSD
# with a uniform weight over the levels. Its step from the blurred levels decays as radius/sigma, and
# at small sigma it stays bounded, as the fake score's error in D is O(sigma) there (EDM's c_out).
def generator_loss(y, sigma, noise, teacher, fake_score, head, div, edges, *, o):
    w = None if o['weighting'] == 'dmd' else 1 / sigma                     # DMD's normaliser, or 1/sigma
    return fdistill.generator_loss(y=y, draws=fdistill.GeneratorNoise(sigma, noise), teacher=teacher, fake_score=fake_score, head=head,
                                   div=div, ratio_norm=fdistill.RatioNorm(o['r_min'], o['r_max'], edges), w_gan=o['w_gan'], w=w)

# Per seed, one start shared by all divergences and settings: the generator regressed onto the skewed
# two-mode mixture, then the fake score and the discriminator head trained on that generator.
# All seeds at once; returns one state dict per seed and network.
def pretrain(o, seeds):
    torch.manual_seed(0)
    mixture, sigma_data, teacher, levels = build(o)
    nets = [networks(o, sigma_data, teacher.channels, seed) for seed in seeds]
    G, fake_score, head = [Ensemble(list(copies)) for copies in zip(*nets)]
    opt = torch.optim.Adam(G.parameters(), lr=1e-3)
    for _ in range(o['pretrain_g']):
        z = torch.randn(512 * len(seeds), 2)
        loss = (G(z) - skewed_target(z, mixture)).square().mean() * len(seeds)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    opt = critic_optimizer(fake_score, head, o)
    for _ in range(o['pretrain_critic']):
        critic_step(G, teacher, fake_score, head, opt, mixture, sigma_data, levels, o=o)
    return [dict(G=G.member_state(i), fake_score=fake_score.member_state(i), head=head.member_state(i)) for i in range(len(seeds))]

def networks(o, sigma_data, channels, seed):     # one run's generator, fake score and head, initialised from seed
    torch.manual_seed(seed)
    return (generator_net(), FakeScore(sigma_data),
            fdistill.DiscriminatorHead(channels=[channels], resolutions=[1], hidden=o['head_hidden']))

def snapshot(G, mixture, n):        # per-run metrics of n fresh samples each
    with torch.no_grad():
        samples = G(torch.randn(n * G.num_runs, 2))
    return [mode_metrics(x, mixture) for x in runs_of(samples, G.num_runs)], samples

# Algorithm 1 for one setting: every divergence and seed from the seeds' pretrained starts, as one model.
def distill(o, starts, progress=print):
    t0 = time.process_time()
    torch.manual_seed(1000)
    mixture, sigma_data, teacher, levels = build(o)
    runs = [(name, seed) for name in NAMES for seed in range(len(starts))]
    R, B = len(runs), o['batch']
    divs = [fdistill.divergence(name) for name, _ in runs]
    edges = fdistill.sigma_bin_edges(levels, o['num_bins'])
    G, fake_score, head = [Ensemble(list(copies)) for copies in zip(*[networks(o, sigma_data, teacher.channels, 0) for _ in runs])]
    for r, (_, seed) in enumerate(runs):
        for net, key in [(G, 'G'), (fake_score, 'fake_score'), (head, 'head')]:
            net.load_member(r, starts[seed][key])
    opt_g = torch.optim.Adam(G.parameters(), lr=o['lr_g'])
    opt_critic = critic_optimizer(fake_score, head, o)
    nvar, clipped = torch.zeros(R), torch.zeros(R)
    history = [(0, snapshot(G, mixture, o['history_samples'])[0])]
    for it in range(o['steps'] * o['tau']):
        if it % o['tau'] == 0:                                              # Alg. 1 line 5
            y = G(torch.randn(R * B, 2))                                    # Alg. 1 line 4
            sigma, noise = fdistill.sample_sigma(levels, R * B), torch.randn(R * B, 2)
            losses = [generator_loss(y_r, sigma_r, noise_r, teacher, fake_score.member(r), head.member(r), divs[r], edges, o=o)
                      for r, (y_r, sigma_r, noise_r) in enumerate(zip(runs_of(y, R), runs_of(sigma, R), runs_of(noise, R)))]
            opt_g.zero_grad(set_to_none=True)
            sum(loss for loss, _ in losses).backward()
            opt_g.step()                                                    # line 12
            nvar += torch.tensor([1 / stats['h_ess'] - 1 for _, stats in losses])   # ESS = 1 / (1 + Var(h)/E[h]^2) in the batch
            clipped += torch.tensor([stats['r_clipped'] for _, stats in losses])
            step = it // o['tau'] + 1
            if step % o['history_every'] == 0:
                history.append((step, snapshot(G, mixture, o['history_samples'])[0]))
                js = [m for (name, _), m in zip(runs, history[-1][1]) if name == 'js']
                progress(f"{o['setting']}: step {step}/{o['steps']}, JS modes {np.mean([m['modes_covered'] for m in js]):.1f}, "
                         f"TV {np.mean([m['tv'] for m in js]):.3f}, off-mode {np.mean([m['off_mode'] for m in js]):.3f}")
        else:
            critic_step(G, teacher, fake_score, head, opt_critic, mixture, sigma_data, levels, o=o)
    final, samples = snapshot(G, mixture, o['eval_samples'])
    for r, m in enumerate(final):
        m.update(weight_variance=float(nvar[r]) / o['steps'], r_clipped=float(clipped[r]) / o['steps'],
                 history=[dict(step=step, modes=ms[r]['modes_covered'], tv=ms[r]['tv'], off_mode=ms[r]['off_mode']) for step, ms in history])
    return dict(runs=runs, metrics=final, samples=[x[:3000] for x in runs_of(samples, R)], cpu_seconds=time.process_time() - t0)

#----------------------------------------------------------------------------
# Fig. 2: at one sigma, for the ring p and a generator-like q that covers every mode imperfectly
# (unequal weights, modes pushed outwards, too wide), the score difference |s_p - s_q| and
# forward-KL's weight h = p_t / q_t. Where q_t has mass but p_t has little (between and outside the
# modes), the score difference is large and h is small: f-distill downweights those samples.

def plot_score_weight(path, o, sigma=0.3):
    p = ring(o['num_modes'], o['radius'], o['std'])
    weights = torch.tensor([3.0, 1.0, 2.0, 0.5, 2.0, 1.0, 3.0, 1.5])[:o['num_modes']]
    q = GaussianMixture(p.means * 1.1, weights / weights.sum(), o['std'] * 1.5)
    n = 200
    lim = o['radius'] * 1.6
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(g, g, indexing='xy'), -1).reshape(-1, 2)
    s = torch.full([len(x)], sigma, dtype=torch.float64)
    log_p, log_q = p.log_prob(x, s), q.log_prob(x, s)
    panels = [('p$_t$ (teacher)', log_p.exp()), ('q$_t$ (generator-like)', log_q.exp()),
              ('|s$_p$ - s$_q$| (log10)', (p.score(x, s) - q.score(x, s)).norm(dim=1).log10()),
              ('forward-KL h = p$_t$/q$_t$ (log10, clipped to ±3)', ((log_p - log_q) / math.log(10)).clamp(-3, 3))]
    fig, axes = plt.subplots(1, 4, figsize=(17, 4))
    for ax, (title, v) in zip(axes, panels):
        im = ax.imshow(v.reshape(n, n).numpy(), origin='lower', extent=[-lim, lim, -lim, lim], cmap='viridis')
        ax.contour(g, g, log_q.exp().reshape(n, n).numpy(), levels=[0.01, 0.05], colors='w', linewidths=0.5)
        ax.set_title(title)
        fig.colorbar(im, ax=ax, fraction=0.046)
    fig.suptitle(f'Score difference and forward-KL weight at sigma = {sigma} (Fig. 2); white: q_t = 0.01, 0.05')
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

#----------------------------------------------------------------------------
# Mode-coverage figures and tables.

# Exact log density of samples noised by sigma: the mean of Gaussian kernels of std sigma on them.
def log_density_noised(x, samples, sigma):
    d2 = torch.cdist(x.double(), samples.double()).square()
    return (-d2 / (2 * sigma ** 2)).logsumexp(1) - math.log(len(samples)) - math.log(2 * math.pi * sigma ** 2)

# Fig. 8: the skewed start and the final q of reverse-KL, JS and forward-KL, each over log10 h(r_t)
# of its divergence at one sigma, r_t = p_t / q_t with both densities exact (q_t of the drawn samples).
# An increasing h is large where p_t has mass that q_t lacks, towards the empty modes; h = 1 is flat.
def plot_fig8(path, mixture, initial, finals, sigma):
    n, lim = 120, float(mixture.means.abs().max()) + 0.8
    g = torch.linspace(-lim, lim, n, dtype=torch.float64)
    x = torch.stack(torch.meshgrid(g, g, indexing='xy'), -1).reshape(-1, 2)
    log_p = mixture.log_prob(x, sigma).double()
    panels = [('initial q (skewed); h of forward-KL', initial, 'fkl')] + [(f'final q, {fdistill.divergence(d).name}', finals[d], d) for d in ['rkl', 'js', 'fkl']]
    fig, axes = plt.subplots(1, 4, figsize=(19, 4.8))
    for ax, (title, q, name) in zip(axes, panels):
        r = (log_p - log_density_noised(x, q[:1500], sigma)).exp()
        log_h = fdistill.divergence(name).h(r).log10().clamp(-3, 3)
        im = ax.imshow(log_h.reshape(n, n).numpy(), origin='lower', extent=[-lim, lim, -lim, lim], cmap='RdBu_r', vmin=-3, vmax=3)
        ax.scatter(q[:1500, 0], q[:1500, 1], s=1, alpha=0.4, color='k')
        ax.scatter(mixture.means[:, 0], mixture.means[:, 1], marker='x', color='tab:green', s=40)
        ax.set_title(f'{title}\nbackground: log10 h(p$_t$/q$_t$), sigma = {sigma:.2f}', fontsize=10)
        ax.set_aspect('equal')
    fig.colorbar(im, ax=axes, fraction=0.012)
    fig.suptitle('Fig. 8 in 2-D (main setting, first seed): true modes x, samples black')
    fig.savefig(path, dpi=100, bbox_inches='tight')
    plt.close(fig)

def plot_mode_coverage(path, mixture, initial, finals, coverage):
    settings = list(finals)
    fig, axes = plt.subplots(len(settings), 7, figsize=(24, 3.7 * len(settings)), squeeze=False)
    lim = float(mixture.means.abs().max()) + 0.8
    for row, setting in zip(axes, settings):
        for ax, name in zip(row, ['initial'] + NAMES):
            x = initial if name == 'initial' else finals[setting][name]
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3, color=COLORS.get(name, 'k'))
            ax.scatter(mixture.means[:, 0], mixture.means[:, 1], marker='x', color='k', s=30)
            if name == 'initial':
                title = f'{setting}: initial (skewed)'
            else:
                m = coverage[setting][name]
                title = f'{fdistill.divergence(name).name}: modes {np.mean(m["modes"]):.1f}, TV {np.mean(m["tv"]):.2f}'
            ax.set_title(title, fontsize=10)
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_aspect('equal')
    fig.suptitle('Alg. 1 in 2-D from a skewed start: final samples of the first seed; titles: mean over seeds')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

# Learning curves: modes covered, TV and off-mode against generator steps, mean ± std over seeds.
def plot_learning_curves(path, coverage):
    settings = list(coverage)
    fig, axes = plt.subplots(len(settings), 3, figsize=(15, 3.6 * len(settings)), squeeze=False)
    for row, setting in zip(axes, settings):
        for ax, (key, label) in zip(row, [('modes', 'modes covered'), ('tv', 'TV to true weights'), ('off_mode', 'off-mode fraction')]):
            for name in NAMES:
                histories = coverage[setting][name]['history']                  # per seed: [{step, modes, tv, off_mode}]
                steps = [h['step'] for h in histories[0]]
                v = np.array([[h[key] for h in seed] for seed in histories])
                ax.plot(steps, v.mean(0), color=COLORS[name], label=fdistill.divergence(name).name)
                ax.fill_between(steps, v.mean(0) - v.std(0), v.mean(0) + v.std(0), color=COLORS[name], alpha=0.15)
            ax.set_title(f'{setting}: {label}', fontsize=10)
            ax.set_xlabel('generator steps')
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.suptitle('Alg. 1 in 2-D: mean ± std over seeds')
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)

def mean_std(values, fmt):
    return f'{np.mean(values):{fmt}} ± {np.std(values):{fmt}}'

def markdown(results):
    o, seeds = results['options'], results['seeds']
    init = results['initial']
    lines = [f"Mode coverage after {o['steps']} generator steps (tau = {o['tau']}), {o['num_modes']} modes {o['radius'] * 2 * math.sin(math.pi / o['num_modes']) / o['std']:.1f} std apart, "
             f"r clipped to [{o['r_min']:g}, {o['r_max']:g}]; mean ± std over {len(seeds)} seeds, each with its own skewed start (modes {mean_std([m['modes_covered'] for m in init], '.1f')}, "
             f"TV {mean_std([m['tv'] for m in init], '.3f')}). Modes per seed in brackets."]
    for setting, c in results['mode_coverage'].items():
        lines += ['', f"**{setting}** (w_GAN = {c['w_gan']:g}, w_t = {'1/sigma' if c['weighting'] == 'eps' else 'DMD normaliser'}; "
                      f"{c['cpu_seconds']:.0f} CPU s for all {len(NAMES) * len(seeds)} runs):", '',
                  '| divergence | mode-seeking | modes covered | TV to true weights | off-mode fraction | Var(h̄)/E[h̄]² in batch | r clipped |',
                  '|---|---|---|---|---|---|---|']
        for name in NAMES:
            m = c[name]
            lines.append(f"| {name} | {fdistill.divergence(name).mode_seeking} | {mean_std(m['modes'], '.1f')} ({', '.join(map(str, m['modes']))}) | "
                         f"{mean_std(m['tv'], '.3f')} | {mean_std(m['off_mode'], '.3f')} | {mean_std(m['weight_variance'], '.3g')} | "
                         f"{np.mean(m['r_clipped']):.3f} |")
    v = results['variance_vs_mean_difference']
    mus = [i for i, mu in enumerate(v['mu']) if abs(mu * 2 - round(mu * 2)) < 1e-9]
    lines += ['', 'Normalised variance Var_q(h)/E_q[h]^2, q = N(0,1), p = N(mu,1) (Fig. 4a):', '',
              '| divergence | ' + ' | '.join(f"mu={v['mu'][i]:g}" for i in mus) + ' |', '|---' * (len(mus) + 1) + '|']
    for name in NAMES:
        lines.append(f'| {name} | ' + ' | '.join(f'{v[name][i]:.4g}' for i in mus) + ' |')
    return '\n'.join(lines) + '\n'

#----------------------------------------------------------------------------
# Each setting is one job for the worker pool, on one thread.

def init_worker():
    torch.set_num_threads(1)

def run_setting(job):
    o, starts = job
    return o['setting'], distill(o, starts)

def parse_args(argv):
    p = argparse.ArgumentParser(prog='toy2d.py', description='2-D reproduction of f-distill Figs. 2, 3, 4a and 8.')
    p.add_argument('--outdir', default='toy2d_out', help='Output folder (created).')
    p.add_argument('--quick', action='store_true', help='Reduced run for tests: 1 seed, 20 generator steps, short pretraining.')
    p.add_argument('--seeds', type=int, default=None, help='Seeds, each with its own skewed start shared by every run (default 5; 1 with --quick).')
    p.add_argument('--steps', type=int, default=None, help='Generator updates per run (default 500; 20 with --quick).')
    p.add_argument('--workers', type=int, default=2, help='Parallel processes, one setting each (1 = in-process).')
    p.add_argument('--settings', default='main,with_gan', help=f'Comma-separated settings to run, of {", ".join(SETTINGS)}.')
    p.add_argument('--w-gan', type=float, default=1e-3, help='GAN loss weight of the with_gan setting (Table 5, CIFAR-10 and SD: 1e-3).')
    p.add_argument('--sigma-max', type=float, default=5.0, help='Largest noise level (the modes sit on a circle of radius 2).')
    p.add_argument('--r-min', type=float, default=0.01, help='Lower clip of the density ratio (Alg. 1 line 6; the paper is silent). As train_*.py. '
                   'The authors\' NVlabs/FastGen clips to [0.1, 20] (fastgen/configs/methods/config_f_distill.py, ratio_lower/upper); '
                   'here, main setting, 5 seeds, that kept JS on the start\'s 2 modes in every seed (docs/notebook.md).')
    p.add_argument('--r-max', type=float, default=100.0, help='Upper clip of the density ratio (NVlabs/FastGen: 20).')
    p.add_argument('--lr-head', type=float, default=1e-3, help='Adam lr of the discriminator head (default: the fake score\'s, as Table 5).')
    args = p.parse_args(argv)
    for flag in ['seeds', 'steps']:
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            p.error(f'--{flag} must be a positive count, got {getattr(args, flag)}')
    if args.workers < 1:
        p.error(f'--workers must be a positive count, got {args.workers}')
    args.seeds = args.seeds or (1 if args.quick else 5)
    args.steps = args.steps or (20 if args.quick else 500)
    args.settings = args.settings.split(',')
    if not args.settings or not set(args.settings) <= set(SETTINGS) or len(set(args.settings)) < len(args.settings):
        p.error(f'--settings must list distinct names of {", ".join(SETTINGS)}, got {",".join(args.settings)}')
    if not 0 < args.r_min < 1:
        p.error(f'--r-min must lie in (0, 1), got {args.r_min:g}')
    if not 1 < args.r_max < math.inf:
        p.error(f'--r-max must be a finite number above 1, got {args.r_max:g}')
    if not 0.002 < args.sigma_max < math.inf:
        p.error(f'--sigma-max must exceed the smallest level 0.002, got {args.sigma_max:g}')
    if not 0 <= args.w_gan < math.inf:
        p.error(f'--w-gan must be a finite number >= 0, got {args.w_gan:g}')
    if not 0 < args.lr_head < math.inf:
        p.error(f'--lr-head must be a positive learning rate, got {args.lr_head:g}')
    if os.path.exists(args.outdir) and not os.path.isdir(args.outdir):
        p.error(f'--outdir {args.outdir} is a file: pass a folder')
    return args

def main(argv=None):
    torch.set_num_threads(1)    # tiny networks: one thread per process is fastest, and workers don't fight
    args = parse_args(argv)
    os.makedirs(args.outdir, exist_ok=True)
    t0 = time.time()
    def progress(msg):
        print(f'[{time.time() - t0:6.1f}s] {msg}', flush=True)

    o = toy_options(args)
    results = dict(options=o, seeds=list(range(args.seeds)), settings={s: setting_options(o, s, args.w_gan) for s in args.settings})
    plot_f_and_h(os.path.join(args.outdir, 'f_and_h.png'))
    progress('f_and_h.png: |f\'(r)| and h(r) (Fig. 3)')

    mus = np.linspace(0, 3, 31 if not args.quick else 7)
    table = dict(mu=mus.tolist())
    for name in NAMES:
        table[name] = [normalized_variance(name, float(mu)) for mu in mus]
    results['variance_vs_mean_difference'] = table
    plot_variance(os.path.join(args.outdir, 'variance.png'), table)
    progress('variance.png: normalised variance at mu=3: ' + ', '.join(f'{n} {table[n][-1]:.3g}' for n in NAMES))

    plot_score_weight(os.path.join(args.outdir, 'score_weight.png'), o)
    progress('score_weight.png: score difference and forward-KL h over the plane (Fig. 2)')

    # Alg. 1: pretrain one start per seed, then each setting (all divergences and seeds as one model) from them.
    seeds = results['seeds']
    starts = pretrain(o, seeds)
    mixture = build(o)[0]
    initial = []
    for seed in seeds:
        G = generator_net()
        G.load_state_dict(starts[seed]['G'])
        with torch.no_grad():
            initial.append(G(torch.randn(o['eval_samples'], 2, generator=torch.Generator().manual_seed(seed))))
    results['initial'] = [mode_metrics(x, mixture) for x in initial]
    progress(f'pretrained the skewed starts of {len(seeds)} seeds: modes ' + ', '.join(str(m['modes_covered']) for m in results['initial']))
    coverage, samples = {}, {}
    jobs = [(results['settings'][s], starts) for s in args.settings]
    workers = min(args.workers, len(jobs))
    pool = multiprocessing.get_context('spawn').Pool(workers, init_worker) if workers > 1 else None
    try:
        for setting, out in (pool.imap_unordered(run_setting, jobs) if pool else map(run_setting, jobs)):
            coverage[setting], samples[setting] = setting_results(results['settings'][setting], out)
            results['mode_coverage'] = {s: coverage[s] for s in args.settings if s in coverage}
            write_results(args.outdir, results, mixture, initial, {s: samples[s] for s in results['mode_coverage']})
            progress(f'{setting} done ({out["cpu_seconds"]:.0f} CPU s): results.json, results.md, mode_coverage.png, learning_curves.png, fig8.png in {args.outdir}')
    finally:
        if pool:
            pool.close()
            pool.join()
    print(markdown(results))

# One setting's runs as results.json's mode_coverage.<setting>.<divergence> (lists over seeds), and the
# first seed's final samples per divergence for the figures.
def setting_results(o, out):
    c = dict(num_modes=o['num_modes'], w_gan=o['w_gan'], weighting=o['weighting'], cpu_seconds=out['cpu_seconds'])
    for name in NAMES:
        per_seed = [m for (n, _), m in zip(out['runs'], out['metrics']) if n == name]
        c[name] = dict(modes=[m['modes_covered'] for m in per_seed],
                       **{key: [m[key] for m in per_seed] for key in ['tv', 'off_mode', 'weight_variance', 'r_clipped', 'occupancy', 'history']})
    return c, {name: out['samples'][out['runs'].index((name, 0))] for name in NAMES}

# Everything computed so far, rewritten after each setting: an interrupted run keeps the settings it finished.
def write_results(outdir, results, mixture, initial, samples):
    o, coverage = results['options'], results['mode_coverage']
    plot_mode_coverage(os.path.join(outdir, 'mode_coverage.png'), mixture, initial[0][:3000], samples, coverage)
    plot_learning_curves(os.path.join(outdir, 'learning_curves.png'), coverage)
    plot_fig8(os.path.join(outdir, 'fig8.png'), mixture, initial[0], samples[next(iter(coverage))],
              sigma=o['radius'] * math.sin(math.pi / o['num_modes']) * 2 / 3)
    rundir.atomic_write(os.path.join(outdir, 'results.json'), lambda f: f.write(json.dumps(results, indent=1).encode()))
    rundir.atomic_write(os.path.join(outdir, 'results.md'), lambda f: f.write(markdown(results).encode()))

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
