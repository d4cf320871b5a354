"""Scaling the training run (issue 11): feature passes that stop after the deepest tap, precision,
gradient clipping, EMA and generator snapshots with FID per snapshot, the benchmark's parts."""

import pytest
import torch

import edm_nets
import fdistill
import sd_unet
from test_edm_nets import inputs, randomize, tiny_adm, tiny_song
from test_sd_unet import TINY

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
        loss, _ = fdistill.generator_loss(generator(z, labels), sigma, noise, teacher(decoder), fake_score, head,
                                          fdistill.divergence('js'), 1e-2, 1e2, edges, 0.5)
        loss.backward()
        head.requires_grad_(True)
        return loss, [p.grad for p in generator.parameters()]

    def critic_grads(decoder):
        fake.zero_grad(set_to_none=True)
        head.zero_grad(set_to_none=True)
        with torch.no_grad():
            y = generator(z, labels)
        loss, _ = fdistill.critic_loss(y, x_real, sigma, noise, sigma, noise_fake, noise, teacher(decoder), fake_score, head, 1.0)
        loss.backward()
        return loss, [p.grad for p in list(fake.parameters()) + list(head.parameters())]

    for grads, mode in ((generator_grads, 'no_grad'), (critic_grads, 'skip')):
        loss_full, grads_full = grads('grad')
        loss, grads_new = grads(mode)
        assert torch.equal(loss, loss_full)
        assert all(torch.equal(a, b) for a, b in zip(grads_new, grads_full))

#----------------------------------------------------------------------------
