"""f-distill: one-step diffusion distillation by f-divergence distribution matching.

Xu, Nie, Vahdat, "One-step Diffusion Models with f-Divergence Distribution Matching", 2025.

Algorithm 1 in the code (the README's map):
  line 1      networks, tau, w_GAN, r_min/r_max     train_edm.py:build_task, train_t2i.py:build_task, flags.py:parse_args
  line 2      for iteration in 0..M                 training_loop.py:training_loop
  line 3      x ~ p_data, eps, t                    training_loop.py:draw, training_loop.py:RealSamples, sample_sigma
  line 4      y = G(eps)                            training_loop.py:generator_step, training_loop.py:critic_step
  line 5      TTUR: generator every tau             training_loop.py:training_loop
  line 6      r = clip(exp(logit))                  ratio
  line 7      first-stage normalisation             normalize_ratio
  line 8      h(r)                                  DIVERGENCES, divergence
  line 9      second-stage normalisation            normalize_weight       (lines 6-9 together: weights)
  line 10     f-distill loss, Eq. 4                 fdistill_loss
  line 11     generator GAN loss                    gan_generator_loss
  line 12     update the student                    generator_loss, training_loop.py:optimizer_step
  line 14     fake score by DSM                     fake_score_loss        (in critic_loss)
  line 15     discriminator GAN loss + R1           gan_discriminator_loss, r1_penalty, r1_penalty_approx (in critic_loss)
              generator EMA                         training_loop.py:update_ema

The whole method, independent of the data domain. Networks come in as callables in EDM's convention:
  teacher(x, sigma)    -> (D_x, features)  frozen teacher denoiser with a feature tap (critic_loss reads
                                           only the features, so D_x may be None there),
  fake_score(x, sigma) -> D_x              online denoiser of the generator's distribution,
  head(features)       -> logits [B]       discriminator head on the teacher's features.
The score of a denoiser is s(x; sigma) = (D(x; sigma) - x) / sigma^2 (EDM Eq. 3), so the score
difference of Theorem 1 is s_teacher - s_fake = (D_teacher - D_fake) / sigma^2.
"""

import contextlib
import math
from typing import Callable, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

#----------------------------------------------------------------------------
# The f-divergences of Table 1, with r = p/q (teacher density over student density).
# h(r) = f''(r) r^2 is the weight on the score difference (Theorem 1).

class Divergence(NamedTuple):
    name:           str         # Long name as in Table 1.
    f:              Callable    # f(r): convex on (0, inf), f(1) = 0. None where only h is defined.
    h:              Callable    # h(r) = f''(r) * r^2 >= 0.
    mode_seeking:   str         # Table 1 column: 'yes', 'medium' or 'no'.

DIVERGENCES = {
    'rkl':       Divergence('reverse-KL',        lambda r: -torch.log(r),                                          lambda r: torch.ones_like(r),  'yes'),
    'srkl':      Divergence('softened RKL',      lambda r: (r + 1) * torch.log(0.5 + 0.5 / r),                     lambda r: 1 / (r + 1),         'yes'),
    'js':        Divergence('Jensen-Shannon',    lambda r: r * torch.log(r) - (r + 1) * torch.log((r + 1) / 2),    lambda r: r / (r + 1),         'medium'),
    'hellinger': Divergence('squared Hellinger', lambda r: 1 - torch.sqrt(r),                                      lambda r: 0.25 * torch.sqrt(r), 'medium'),
    'fkl':       Divergence('forward-KL',        lambda r: r * torch.log(r),                                       lambda r: r,                   'no'),
    'jeffreys':  Divergence('Jeffreys',          lambda r: (r - 1) * torch.log(r),                                 lambda r: r + 1,               'no'),
}

# Di-Bregman (Zhu et al. 2025, Table 1, Theorem 3.1) weights the same score difference by h_B''(r_B) r_B
# with their ratio r_B = q/p = 1/r. In our convention SBA(lambda) gives h(r) = r^(-lambda), and
# LR == 'js', KL == 'rkl' (SBA lambda=0), BE == 'fkl' (SBA lambda=-1), LS == SBA lambda=1 (h = 1/r).
def sba(lam):
    return Divergence(f'SBA({lam:g})', None, lambda r: r.pow(-lam), 'yes' if lam >= 0 else 'medium' if lam > -1 else 'no')

def divergence(name):
    if name.startswith('sba:'):
        try:
            lam = float(name[4:])
        except ValueError:
            lam = float('nan')
        if not math.isfinite(lam):
            raise ValueError(f'--f {name}: SBA needs a finite number, e.g. sba:5')
        return sba(lam)
    if name not in DIVERGENCES:
        raise ValueError(f'Unknown divergence "{name}": choose one of {", ".join(DIVERGENCES)} or sba:<lambda>')
    return DIVERGENCES[name]

#----------------------------------------------------------------------------
# Noise levels. DMD2 discretises EDM's Karras schedule into 1000 levels and draws the
# distribution-matching sigma uniformly from the levels between 2% and 98%.

def karras_sigmas(num_levels=1000, sigma_min=0.002, sigma_max=80, rho=7):
    i = torch.arange(num_levels, dtype=torch.float64) / (num_levels - 1)
    return (sigma_min ** (1 / rho) + i * (sigma_max ** (1 / rho) - sigma_min ** (1 / rho))) ** rho  # ascending

def sample_sigma(levels, batch_size, lo=0.02, hi=0.98, generator=None):
    n = len(levels)
    idx = torch.randint(int(lo * n), int(hi * n), (batch_size,), generator=generator, device=levels.device)
    return levels[idx].float()

# Stage-1 bins hold equal shares of the sampled sigmas: edges at equal steps of the level index.
# (Ten equal widths in sigma put about two thirds of the samples, sigma 0.003 to 8, in the lowest bin.)
def sigma_bin_edges(levels, num_bins, lo=0.02, hi=0.98):
    n = len(levels)
    cuts = torch.linspace(lo * n, hi * n, num_bins + 1)[1:-1].long()
    return levels[cuts].float()

#----------------------------------------------------------------------------
# Density ratio and the two-stage normalisation (Sec. 4, Alg. 1 lines 6-9).

def all_reduce(x, op=dist.ReduceOp.SUM):
    if dist.is_initialized():
        dist.all_reduce(x, op=op)
    return x

# Alg. 1 line 6: r = clip(exp(logit), r_min, r_max). The optimal discriminator has
# sigmoid(logit) = p/(p+q), so exp(logit) = p/q (Sec. 3). Clipping in log space avoids overflow.
def ratio(logits, r_min, r_max):
    return logits.float().clamp(math.log(r_min), math.log(r_max)).exp()

# Alg. 1 line 7, stage 1: E_q[r_t] = 1 at every t, so divide r by its mean within its sigma bin.
# (Alg. 1 writes r_i / sum_i r_i; Sec. 4 says average, which keeps E[r] = 1 as h expects.)
# Sums and counts are all-reduced, so the means are over the global batch. With `running` (a float64 tensor
# of per-bin means, NaN = none yet) the means are an EMA across iterations instead, running <- beta running +
# (1 - beta) batch mean, updated in place (FastGen uses beta = 0.5 on ImageNet-64); bins absent keep theirs.
def normalize_ratio(r, sigma, edges, running=None, beta=0.0):
    sigma = torch.as_tensor(sigma, device=r.device).flatten().expand(r.shape)   # [B], or one sigma for all
    idx = torch.bucketize(sigma.float(), edges.to(r.device))
    stats = torch.zeros(2, len(edges) + 1, device=r.device, dtype=torch.float64)
    stats[0].index_add_(0, idx, r.double())
    stats[1].index_add_(0, idx, torch.ones_like(r, dtype=torch.float64))
    all_reduce(stats)
    mean = stats[0] / stats[1].clamp(min=1)
    if running is not None:
        ema = torch.where(torch.isnan(running), mean, beta * running + (1 - beta) * mean)
        mean = running.copy_(torch.where(stats[1] > 0, ema, running))
    return r / mean[idx].float()

# Alg. 1 line 9, stage 2: divide h by its global batch mean, so the f-distill term keeps the same scale
# relative to the GAN term whatever f is.
def normalize_weight(h):
    stats = all_reduce(torch.stack([h.double().sum(), torch.tensor(float(h.numel()), dtype=torch.float64, device=h.device)]))
    return h / (stats[0] / stats[1]).float()

# Alg. 1 lines 6-9: clipped ratio, stage-1 and stage-2 normalisation, h_bar.
@torch.no_grad()
def weights(logits, sigma, div, r_min, r_max, edges, running=None, beta=0.0):
    r = ratio(logits.detach().flatten(), r_min, r_max)
    return normalize_weight(div.h(normalize_ratio(r, sigma, edges, running, beta)))

#----------------------------------------------------------------------------
# Diagnostics of the weights, which users need to spot high-variance training (App. D.4): r and h_bar (mean,
# min, max), the share of r at the clip, the effective sample size of h_bar, and its spread per sigma bin.
# All-reduced: the same on every process.

@torch.no_grad()
def weight_stats(logits, h_bar, sigma, r_min, r_max, edges):
    r = ratio(logits.detach().flatten(), r_min, r_max)
    clipped = ((r <= r_min * (1 + 1e-6)) | (r >= r_max * (1 - 1e-6))).float()
    sums = all_reduce(torch.stack([r.sum(), clipped.sum(), h_bar.sum(), h_bar.square().sum(), torch.tensor(float(r.numel()), device=r.device)]).double())
    mins = all_reduce(torch.stack([r.min(), h_bar.min()]), dist.ReduceOp.MIN)
    maxs = all_reduce(torch.stack([r.max(), h_bar.max()]), dist.ReduceOp.MAX)
    n = sums[4]
    stats = dict(r_mean=sums[0] / n, r_min=mins[0], r_max=maxs[0], r_clipped=sums[1] / n,
                 h_mean=sums[2] / n, h_min=mins[1], h_max=maxs[1], h_ess=sums[2] ** 2 / (n * sums[3]))
    return {k: float(v) for k, v in stats.items()} | weight_bins(h_bar, sigma, edges)

# Per-sigma-bin diagnostics, on the stage-1 bins: can the discriminator tell the critic's real batch from its
# generated one at each noise level (accuracy 0.5 = chance, where r ~ 1 and every f weights like reverse-KL),
# and how much does h_bar vary within the level (0 for reverse-KL)? Sums all-reduced; empty bins are left out.
def bin_sums(values, sigma, edges):
    sigma = torch.as_tensor(sigma, device=values.device).flatten().expand(values.shape[-1:])
    idx = torch.bucketize(sigma.float(), edges.to(values.device))
    sums = torch.zeros(len(values), len(edges) + 1, dtype=torch.float64, device=values.device)
    for row, v in zip(sums, values.double()):
        row.index_add_(0, idx, v)
    return all_reduce(sums)

@torch.no_grad()
def discriminator_bins(logits_real, logits_fake, sigma, edges):
    correct = (logits_real.detach().float().flatten() > 0).double() + (logits_fake.detach().float().flatten() < 0).double()
    hits, count = bin_sums(torch.stack([correct, torch.full_like(correct, 2)]), sigma, edges)
    stats = {f'disc_acc_bin{k}': float(hits[k] / count[k]) for k in range(len(count)) if count[k] > 0}
    return dict(disc_acc=float(hits.sum() / count.sum()), **stats)

@torch.no_grad()
def weight_bins(h_bar, sigma, edges):
    count, total, squares = bin_sums(torch.stack([torch.ones_like(h_bar), h_bar, h_bar.square()]), sigma, edges)
    std = (squares / count.clamp(min=1) - (total / count.clamp(min=1)) ** 2).clamp(min=0).sqrt()  # population std
    return {f'h_std_bin{k}': float(std[k]) for k in range(len(count)) if count[k] > 0}

#----------------------------------------------------------------------------
# The f-distill loss (Eq. 4) in denoiser form, as DMD2 writes it.
# grad = w * h * (D_fake - D_teacher) = -w * sigma^2 * h * (s_teacher - s_fake), with DMD's per-sample
# normaliser w = 1 / mean|y - D_teacher(x_t)| (DMD Eq. 8) that equalises gradient scale across sigma.
# 0.5 * mse(y, sg(y - grad)) has gradient grad / y.numel() w.r.t. y; with h = 1 this is DMD2's loss.

def fdistill_loss(y, D_teacher, D_fake, h, w=None):
    with torch.no_grad():
        shape = (-1,) + (1,) * (y.ndim - 1)
        if w is None:
            w = 1 / (y - D_teacher).abs().mean(dim=tuple(range(1, y.ndim)), keepdim=True)
        w = torch.as_tensor(w, device=y.device)
        grad = torch.nan_to_num(w.reshape(shape) * h.reshape(shape) * (D_fake - D_teacher))
    return 0.5 * F.mse_loss(y.float(), (y - grad).detach().float())

#----------------------------------------------------------------------------
# The auxiliary losses: fake-score denoising score matching, non-saturating GAN, R1.

# Alg. 1 line 14: DSM on generator samples, lambda(sigma) ||D(y + sigma n) - y||^2, with EDM's weighting
# lambda(sigma) = (sigma^2 + sigma_data^2) / (sigma * sigma_data)^2 unless `weight` gives another lambda.
def fake_score_loss(fake_score, y, sigma, noise, sigma_data=0.5, weight=None):
    shape = (-1,) + (1,) * (y.ndim - 1)
    sigma = sigma.reshape(shape)
    D = fake_score(y + sigma * noise, sigma)
    weight = (sigma ** 2 + sigma_data ** 2) / (sigma * sigma_data) ** 2 if weight is None else weight(sigma)
    return (weight * (D.float() - y.float()).square()).mean()

# An eps-prediction UNet's own loss, as SD is trained and DMD2 trains its fake score: ||eps_hat - eps||^2 =
# ||D - y||^2 / sigma^2, since D = x - sigma eps_hat and x = y + sigma eps. (EDM's lambda with sigma_data = 1
# is (1 + sigma^2) times this: 214x at SD's t = 999.)
def eps_weight(sigma):
    return 1 / sigma ** 2

# Sec. 3, L_GAN(lambda), with D_lambda = sigmoid(logit): -log D(real) - log(1 - D(fake)).
def gan_discriminator_loss(logits_real, logits_fake):
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()

# Non-saturating generator side: -log D(fake).
def gan_generator_loss(logits_fake):
    return F.softplus(-logits_fake.float()).mean()

# R1 (Mescheder et al. 2018) on noised real inputs: E||grad_x logit(x)||^2; the loss adds gamma/2 times it.
def r1_penalty(logits_real, x_real):
    grad, = torch.autograd.grad(logits_real.sum(), x_real, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()

# R1 by finite differences (FastGen's approximate R1, after APT, Lin et al. 2025): E_n (logit(x + alpha n) -
# logit(x))^2 / alpha^2, which tends to E||grad_x logit(x)||^2 as alpha -> 0 (n ~ N(0, I)), so gamma keeps
# its meaning. No double backward: the frozen teacher's features need no graph, only the head's.
def r1_penalty_approx(logits_real, logits_perturbed, alpha):
    return ((logits_perturbed.float() - logits_real.float()) / alpha).square().mean()

#----------------------------------------------------------------------------
# Discriminator head on frozen teacher features (App. B): one small conv branch per feature
# resolution (stride-2 convs down to 4x4, a full-size conv to 1x1, then a 1x1 conv to a logit);
# with several resolutions, as CIFAR-10's (32, 16, 8), the branches' logits are averaged.

class DiscriminatorHead(torch.nn.Module):
    def __init__(self,
        channels,           # Channels of each feature map, e.g. [768] for ImageNet-64 at 8x8.
        resolutions,        # Spatial size of each feature map, e.g. [8]; 1 for feature vectors [B, C, 1, 1].
        hidden  = None,     # Hidden channels of each branch; None = same as the input.
    ):
        super().__init__()
        self.branches = torch.nn.ModuleList()
        for c_in, res in zip(channels, resolutions):
            c = hidden or c_in
            groups = math.gcd(32, c // 4 or 1)   # at least 4 channels a group, or GroupNorm zeroes 1x1 maps
            layers = []
            while res > 4:
                layers += [torch.nn.Conv2d(c_in, c, 4, stride=2, padding=1), torch.nn.GroupNorm(groups, c), torch.nn.SiLU()]
                c_in, res = c, res // 2
            layers += [torch.nn.Conv2d(c_in, c, res), torch.nn.GroupNorm(groups, c), torch.nn.SiLU(), torch.nn.Conv2d(c, 1, 1)]
            self.branches.append(torch.nn.Sequential(*layers))

    # In fp32 whatever the autocast: r = exp(logit) (Alg. 1 line 6) would otherwise move in bf16's steps,
    # 1.6-3.1 % for |logit| in 2-8. The head is small next to the teacher whose features it reads.
    def forward(self, features):
        with torch.autocast(features[0].device.type, enabled=False):
            logits = [branch(f.float()).flatten() for branch, f in zip(self.branches, features)]
            return torch.stack(logits).mean(0)

#----------------------------------------------------------------------------
# One generator step and one critic step of Alg. 1, given generator samples y and the step's random numbers.
# The caller draws them, so every process can slice one global batch of random numbers.

# The random numbers of a generator step, one row per sample.
class GeneratorNoise(NamedTuple):
    sigma:      torch.Tensor            # [B] noise level of Eq. 4, one of DMD2's levels 2%-98% (sample_sigma).
    noise:      torch.Tensor            # [B, ...] eps ~ N(0, I): x = y + sigma * eps.

# The random numbers of a critic step, one row per sample.
class CriticNoise(NamedTuple):
    sigma_dsm:  torch.Tensor            # [B] noise level of the fake score's DSM (DMD2: all levels).
    noise_dsm:  torch.Tensor            # [B, ...] its eps.
    sigma_gan:  torch.Tensor            # [B] noise level of the discriminator's inputs, real and generated (as r is read at).
    noise_fake: torch.Tensor            # [B, ...] eps of the generated input.
    noise_real: torch.Tensor            # [B, ...] eps of the real input.
    noise_r1:   torch.Tensor = None     # [B, ...] direction of the finite-difference R1; None for exact R1.

# How the density ratio is clipped and normalised in stage 1 (Alg. 1 lines 6-7).
class RatioNorm(NamedTuple):
    r_min:      float                   # Lower clip of r.
    r_max:      float                   # Upper clip of r.
    edges:      torch.Tensor            # Stage-1 sigma bin edges (sigma_bin_edges).
    running:    torch.Tensor = None     # Per-bin running means of r, updated in place; None = this batch only.
    beta:       float = 0.0             # EMA decay of the running means.

# Alg. 1 lines 6-12: f-distill loss + w_GAN * generator GAN loss. The logits the GAN loss needs
# give r for free; the teacher runs once, with gradients to y through its features only.
def generator_loss(*,
    y,                  # [B, ...] generator samples G(z) (Alg. 1 line 4), with their graph.
    draws,              # GeneratorNoise: sigma and eps of x = y + sigma * eps (Eq. 4).
    teacher,            # teacher(x, sigma) -> (D_x, features): frozen s_phi.
    fake_score,         # fake_score(x, sigma) -> D_x: online s_psi, no gradient here.
    head,               # head(features) -> logits [B]: D_lambda; the caller freezes its parameters.
    div,                # Divergence: h(r) of Table 1.
    ratio_norm,         # RatioNorm: clip and stage-1 bins of r (Alg. 1 lines 6-7).
    w_gan,              # Weight of the generator's GAN loss (Alg. 1 line 12).
    w           = None, # Eq. 4's per-sample weight; None = DMD's normaliser (fdistill_loss).
):
    shape = (-1,) + (1,) * (y.ndim - 1)
    sigma = draws.sigma.reshape(shape)
    x_t = y + sigma * draws.noise                           # Eq. 4: x = G(z) + sigma * eps
    with torch.set_grad_enabled(w_gan > 0):
        D_teacher, features = teacher(x_t, sigma)
        logits = head(features)
    with torch.no_grad():
        D_fake = fake_score(x_t.detach(), sigma)
    h_bar = weights(logits, draws.sigma, div, *ratio_norm)
    loss_fdistill = fdistill_loss(y, D_teacher.detach(), D_fake, h_bar, w)
    loss_gan = gan_generator_loss(logits)
    stats = weight_stats(logits, h_bar, draws.sigma, ratio_norm.r_min, ratio_norm.r_max, ratio_norm.edges)
    stats.update(loss_fdistill=loss_fdistill.item(), loss_gan_g=loss_gan.item())
    return loss_fdistill + w_gan * loss_gan, stats

# Alg. 1 lines 14-15: the fake score learns the generator's distribution by DSM; the head learns
# real-vs-generated on teacher features, plus gamma/2 * R1 on the noised real inputs: exact, or with
# r1_alpha > 0 by finite differences along draws.noise_r1.
def critic_loss(*,
    y,                  # [B, ...] generator samples (Alg. 1 line 4); no gradient reaches the generator.
    x_real,             # [B, ...] real samples x ~ p_data (Alg. 1 line 3).
    draws,              # CriticNoise: sigmas and eps of the DSM and GAN inputs.
    teacher,            # teacher(x, sigma) -> (D_x, features): frozen s_phi; only the features are read.
    fake_score,         # fake_score(x, sigma) -> D_x: online s_psi, trained here.
    head,               # head(features) -> logits [B]: D_lambda, trained here.
    gamma,              # R1 weight: the loss adds gamma/2 * R1; 0 = off.
    r1_alpha    = 0,    # > 0: R1 by finite differences with perturbation r1_alpha * noise_r1 (FastGen).
    sigma_data  = 0.5,  # EDM's sigma_data of the DSM weighting.
    dsm_weight  = None, # dsm_weight(sigma) -> lambda(sigma) of the DSM; None = EDM's.
    edges       = None, # Stage-1 sigma bins: per-bin discriminator accuracy in the stats; None = overall only.
):
    shape = (-1,) + (1,) * (y.ndim - 1)
    y = y.detach()
    loss_dsm = fake_score_loss(fake_score, y, draws.sigma_dsm, draws.noise_dsm, sigma_data, dsm_weight)
    sigma_gan = draws.sigma_gan.reshape(shape)
    with torch.no_grad():
        _, features_fake = teacher(y + sigma_gan * draws.noise_fake, sigma_gan)
    exact_r1 = gamma > 0 and not r1_alpha > 0
    x_real_t = (x_real + sigma_gan * draws.noise_real).detach().requires_grad_(exact_r1)
    # Exact R1 differentiates through the teacher twice; fused attention kernels have no double backward.
    with torch.set_grad_enabled(exact_r1), sdpa_kernel(SDPBackend.MATH) if exact_r1 else contextlib.nullcontext():
        _, features_real = teacher(x_real_t, sigma_gan)
    features = [features_real, features_fake]
    if gamma > 0 and r1_alpha > 0:
        with torch.no_grad():
            features.append(teacher(x_real_t + r1_alpha * draws.noise_r1, sigma_gan)[1])
    logits = head([torch.cat(f) for f in zip(*features)])                                      # one call: DDP-friendly
    logits_real, logits_fake, logits_perturbed = logits.split([len(x_real), len(y), len(logits) - len(x_real) - len(y)])
    loss_gan = gan_discriminator_loss(logits_real, logits_fake)
    if gamma > 0:
        loss_r1 = r1_penalty(logits_real, x_real_t) if exact_r1 else r1_penalty_approx(logits_real, logits_perturbed, r1_alpha)
    else:
        loss_r1 = torch.zeros([], device=y.device)
    stats = dict(loss_dsm=loss_dsm.item(), loss_gan_d=loss_gan.item(), loss_r1=loss_r1.item(),
                 logit_real=logits_real.mean().item(), logit_fake=logits_fake.mean().item())
    if edges is not None:
        stats.update(discriminator_bins(logits_real, logits_fake, draws.sigma_gan, edges))
    return loss_dsm + loss_gan + 0.5 * gamma * loss_r1, stats

#----------------------------------------------------------------------------
