# Tests for sd_unet.py. Independent truths: diffusers' UNet2DConditionModel and DDIM/DDPM schedulers
# (keys, shapes, outputs), closed forms for Gaussian and point-mass data, and autograd.

import json
import os
import shutil
import pytest
import torch

os.environ['HF_HUB_OFFLINE'] = '1'

import diffusers
import transformers
import sd_unet
from sd_unet import (SIGMAS, ALPHAS_CUMPROD, SDUNet, SDGenerator, add_noise, cfg_eps, ddim_sample, encode_prompts, eps_to_x0,
    load_sd, sd_denoiser, sigma_to_timestep, sqrt_alphas, vae_decode, vae_encode)

# The inverse of eps_to_x0, and the score of x_t from eps: the relations the schedule tests check.
def x0_to_eps(x_t, x0, t):
    a, s = sqrt_alphas(t, x_t)
    return (x_t - a * x0) / s

def score_from_eps(eps, t): # grad_{x_t} log p_t(x_t) = -eps / sqrt(1 - abar_t)
    return -eps / sqrt_alphas(t, eps)[1]

# SD v1.5's unet/config.json (the fields that differ from UNet2DConditionModel's defaults).
SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)

# The tiny layout of the issue (2 levels) and a 3-level one that has every block kind SD v1.5 has.
TINY = dict(sample_size=8, block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32, attention_head_dim=2, norm_num_groups=8,
    down_block_types=('CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D'))
TINY3 = dict(sample_size=8, block_out_channels=(16, 32, 32), layers_per_block=2, cross_attention_dim=24, attention_head_dim=4, norm_num_groups=8,
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'), up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'))

def tiny_pair(config, seed=0):
    # A random diffusers UNet and an SDUNet holding the same weights (strict load).
    torch.manual_seed(seed)
    ref = diffusers.UNet2DConditionModel(**config).eval()
    with torch.no_grad(): # Non-trivial norm affines, so a swapped weight/bias would show.
        for name, p in ref.named_parameters():
            if 'norm' in name:
                p.add_(0.1 * torch.randn_like(p))
    net = SDUNet(**config)
    net.load_state_dict(ref.state_dict(), strict=True)
    return ref, net

#----------------------------------------------------------------------------
# The UNet against diffusers.

def test_full_size_state_dict_matches_diffusers_sd15():
    with torch.device('meta'):
        ours = SDUNet()
        ref = diffusers.UNet2DConditionModel(**SD15)
        eps, features = ours.forward_features(torch.zeros(1, 4, 64, 64), 999, torch.zeros(1, 77, 768))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert sum(p.numel() for p in ours.parameters()) == 859_520_964
    assert eps.shape == (1, 4, 64, 64) and features['mid'].shape == (1, 1280, 8, 8)
    assert [tuple(d.shape[1:]) for d in features['down']] == [(320, 32, 32), (640, 16, 16), (1280, 8, 8), (1280, 8, 8)]

@pytest.mark.parametrize('config,size', [(TINY, (8, 8)), (TINY3, (8, 8)), (TINY3, (10, 6))])
def test_output_matches_diffusers(config, size):
    ref, net = tiny_pair(config)
    torch.manual_seed(1)
    x = torch.randn(2, 4, *size)
    ctx = torch.randn(2, 7, config['cross_attention_dim'])
    t = torch.tensor([999, 17])
    with torch.no_grad():
        expected = ref(x, t, ctx).sample
        assert torch.allclose(net(x, t, ctx), expected, atol=1e-5, rtol=1e-4)
        assert torch.allclose(net(x, 250, ctx), ref(x, 250, ctx).sample, atol=1e-5, rtol=1e-4) # scalar timestep broadcasts
    ref.load_state_dict(net.state_dict(), strict=True) # round trip back into diffusers

def test_forward_features_taps_and_gradient_checkpointing():
    torch.manual_seed(0)
    net = SDUNet(**TINY)
    x = torch.randn(2, 4, 8, 8)
    ctx = torch.randn(2, 5, 32)

    calls = []
    net.down_blocks[0].resnets[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    net.down_blocks[0].attentions[0].proj_in.register_forward_hook(lambda *_: calls.append(2))

    def grads():
        calls.clear()
        sample = x.clone().requires_grad_(True)
        eps, features = net.forward_features(sample, torch.tensor([3, 900]), ctx)
        loss = eps.square().mean() + features['mid'].sum() + sum(d.mean() for d in features['down'])
        net.zero_grad()
        loss.backward()
        return [sample.grad] + [p.grad.clone() for p in net.parameters()], features

    plain, features = grads()
    assert features['mid'].shape == (2, 64, 4, 4)
    assert [tuple(d.shape[1:]) for d in features['down']] == [(32, 4, 4), (64, 4, 4)]
    assert plain[0].abs().sum() > 0 # gradients reach the sample through the taps and eps
    assert sorted(calls) == [1, 2]
    net.gradient_checkpointing = True
    assert all(m.gradient_checkpointing for m in net.modules() if isinstance(m, (sd_unet.ResnetBlock, sd_unet.SpatialTransformer)))
    checkpointed, _ = grads()
    assert sorted(calls) == [1, 1, 2, 2] # resnet and transformer recomputed in the backward pass
    for a, b in zip(plain, checkpointed):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-5)

def test_bf16_autocast_on_cpu():
    torch.manual_seed(0)
    net = SDUNet(**TINY)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        eps = net(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 7, 32))
    assert eps.dtype == torch.bfloat16 and eps.shape == (2, 4, 8, 8) and torch.isfinite(eps).all()
    with pytest.raises(ValueError, match='unsupported block types'):
        SDUNet(**dict(TINY, down_block_types=('CrossAttnDownBlock2D', 'UpBlock2D')))

#----------------------------------------------------------------------------
# Schedule and conversions against closed forms.

def abar_at(t):
    # abar for fractional t, log(sigma) interpolated linearly between the trained levels (what sigma_to_timestep inverts).
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1, 1, 1, 1)
    lo = t.floor().clamp(0, 998).long()
    log_sigma = torch.lerp(SIGMAS[lo].log(), SIGMAS[lo + 1].log(), t - lo)
    return 1 / (1 + (2 * log_sigma).exp())

class GaussianEps:
    # Exact eps-prediction for data x0 ~ N(mean, std^2 I), mean given per sample by the context:
    # E[x0 | x_t] = mean + sqrt(abar) std^2 (x_t - sqrt(abar) mean) / (abar std^2 + 1 - abar); std = 0 is a point mass.
    def __init__(self, std):
        self.std = std

    def __call__(self, x_t, t, mean):
        abar = abar_at(t).to(x_t.dtype)
        x0 = mean + abar.sqrt() * self.std ** 2 * (x_t - abar.sqrt() * mean) / (abar * self.std ** 2 + 1 - abar)
        return (x_t - abar.sqrt() * x0) / (1 - abar).sqrt()

    def forward_features(self, x_t, t, mean, decoder='grad'):
        return self(x_t, t, mean), {}

def test_schedule_matches_diffusers_scaled_linear():
    ref = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear')
    assert torch.allclose(ALPHAS_CUMPROD.float(), ref.alphas_cumprod, rtol=1e-5, atol=1e-7)
    assert torch.allclose(SIGMAS, ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD).sqrt())
    assert abs(SIGMAS[0] - 0.0292) < 1e-4 and abs(SIGMAS[999] - 14.6146) < 1e-3
    x0, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([0, 500, 999])
    assert torch.allclose(add_noise(x0, noise, t), ref.add_noise(x0, noise, t), atol=1e-5)

def test_eps_x0_score_conversions_closed_form():
    torch.manual_seed(0)
    x_t, x0 = torch.randn(4, 3, 5, 5, dtype=torch.float64), torch.randn(4, 3, 5, 5, dtype=torch.float64)
    t = torch.tensor([0, 1, 500, 999])
    assert torch.allclose(eps_to_x0(x_t, x0_to_eps(x_t, x0, t), t), x0) # x0 -> eps -> x0
    noise = torch.randn_like(x0)
    assert torch.allclose(x0_to_eps(add_noise(x0, noise, t), x0, t), noise)
    # Gaussian data N(0, std^2): x_t ~ N(0, abar std^2 + 1 - abar), score -x_t / (abar std^2 + 1 - abar).
    std, abar = 0.7, ALPHAS_CUMPROD[t].reshape(-1, 1, 1, 1)
    eps = GaussianEps(std)(x_t, t, torch.zeros_like(x_t))
    assert torch.allclose(score_from_eps(eps, t), -x_t / (abar * std ** 2 + 1 - abar))
    # Its EDM view: x = x_t / sqrt(abar), D = x - sigma eps, EDM score (D - x) / sigma^2 = sqrt(abar) * DDPM score.
    sigma = SIGMAS[t].reshape(-1, 1, 1, 1)
    x = x_t / abar.sqrt()
    assert torch.allclose(((x - sigma * eps) - x) / sigma ** 2, abar.sqrt() * score_from_eps(eps, t))
    assert torch.allclose(abar, 1 / (1 + sigma ** 2))

def test_sigma_to_timestep_inverts_the_table():
    t = torch.tensor([0, 1, 2, 250, 998, 999])
    assert torch.allclose(sigma_to_timestep(SIGMAS[t].float()), t.float(), atol=2e-3)
    mid = (SIGMAS[499] * SIGMAS[500]).sqrt() # geometric midpoint -> t = 499.5
    assert abs(sigma_to_timestep(mid).item() - 499.5) < 1e-3
    assert sigma_to_timestep(torch.tensor([1e-4, 80.0])).tolist() == [0.0, 999.0] # clamped to the trained range

@pytest.mark.parametrize('sigma', [SIGMAS[0].item(), SIGMAS[600].item(), 0.5, 3.3, SIGMAS[999].item()], ids=['t0', 't600', '0.5', '3.3', 't999'])
def test_sd_denoiser_is_the_gaussian_edm_denoiser(sigma):
    # For x0 ~ N(0, std^2), EDM's ideal denoiser is D(x; sigma) = std^2 / (std^2 + sigma^2) x, on and off the trained levels.
    std = 0.6
    torch.manual_seed(0)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64) * (std ** 2 + sigma ** 2) ** 0.5
    D = sd_denoiser(GaussianEps(std), torch.zeros_like(x))
    assert torch.allclose(D(x, torch.full([3], sigma)), std ** 2 / (std ** 2 + sigma ** 2) * x, rtol=1e-4, atol=1e-5)
    assert torch.allclose(D(x, sigma), D(x, torch.full([3, 1, 1, 1], sigma)))

def test_cfg_scale_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    net = SDUNet(**TINY)
    x, ctx, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32), torch.randn(1, 7, 32)
    sigma = torch.tensor([0.3, 5.0])
    with torch.no_grad():
        cond = sd_denoiser(net, ctx)(x, sigma)
        assert torch.allclose(sd_denoiser(net, ctx, uncond, cfg=1.0)(x, sigma), cond, atol=1e-6)
        plain = sd_denoiser(net, uncond.expand_as(ctx))(x, sigma)
        assert torch.allclose(sd_denoiser(net, ctx, uncond, cfg=2.5)(x, sigma), plain + 2.5 * (cond - plain), atol=1e-5) # D is affine in eps
        D_x, features = sd_denoiser(net, ctx, uncond, cfg=1.75)(x, sigma, return_features=True)
    assert features['mid'].shape == (2, 64, 4, 4)
    e_u, e_c = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(cfg_eps(e_u, e_c, 1.0), e_c)
    with pytest.raises(ValueError, match='uncond_ctx'):
        sd_denoiser(net, ctx, cfg=1.75)
    with pytest.raises(ValueError, match='class_labels'):
        sd_denoiser(net, ctx)(x, sigma, torch.ones(2, 10))

#----------------------------------------------------------------------------
# One-step generator and the DDIM teacher sampler.

def test_generator_and_ddim_with_analytic_data():
    torch.manual_seed(0)
    z = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    mean_c, mean_u = torch.randn(2, 3, 4, 4, dtype=torch.float64), torch.randn(1, 3, 4, 4, dtype=torch.float64)
    point = GaussianEps(std=0.0)
    # A point mass is recovered exactly in one step, and DDIM with CFG lands on the guided point mean_u + w (mean_c - mean_u).
    assert torch.allclose(SDGenerator(point)(z, mean_c), mean_c)
    for num_steps in (1, 4, 50):
        x0 = ddim_sample(point, z, mean_c, mean_u, num_steps=num_steps, cfg=3.0)
        assert torch.allclose(x0, mean_u + 3.0 * (mean_c - mean_u))
    # Gaussian data: DDIM is Euler on the probability-flow ODE dx/dsigma = eps in the EDM variable x = x_t / sqrt(abar),
    # whose exact solution scales x by sqrt(std^2 + sigma^2), so x0 = x_T / sqrt(abar_999) * std / sqrt(std^2 + sigma_999^2).
    std = 0.5
    exact = z / ALPHAS_CUMPROD[999].sqrt() * std / (std ** 2 + SIGMAS[999] ** 2).sqrt()
    errors = [(ddim_sample(GaussianEps(std), z, torch.zeros_like(z), num_steps=n, cfg=1.0) - exact).abs().max() / exact.abs().max() for n in (50, 1000)]
    assert errors[1] < 1e-2 and errors[1] < errors[0] / 10 # first order: error ~ 1/num_steps

def test_ddim_matches_diffusers_ddim_scheduler():
    ref, net = tiny_pair(TINY)
    torch.manual_seed(2)
    z, ctx, uncond = torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32), torch.randn(1, 7, 32)
    scheduler = diffusers.DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', clip_sample=False,
        set_alpha_to_one=True, timestep_spacing='trailing')
    scheduler.set_timesteps(4)
    x = z
    with torch.no_grad():
        for t in scheduler.timesteps:
            eps_c, eps_u = ref(x, t, ctx).sample, ref(x, t, uncond.expand_as(ctx)).sample
            x = scheduler.step(eps_u + 2.0 * (eps_c - eps_u), t, x).prev_sample
    assert scheduler.timesteps.tolist() == [999, 749, 499, 249]
    assert torch.allclose(ddim_sample(net, z, ctx, uncond, num_steps=4, cfg=2.0), x, atol=1e-4, rtol=1e-4)
    # One DDIM step without guidance is the one-step generator, which is differentiable.
    z.requires_grad_(True)
    x0 = SDGenerator(net)(z, ctx)
    assert torch.allclose(x0.detach(), ddim_sample(net, z.detach(), ctx, num_steps=1, cfg=1.0), atol=1e-6)
    x0.sum().backward()
    assert z.grad.abs().sum() > 0 and net.conv_in.weight.grad is not None

#----------------------------------------------------------------------------
# Loading a diffusers-format folder written here (tiny random models, a hand-written BPE vocabulary).

def write_tiny_sd_folder(folder):
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel(**TINY)
    unet.save_pretrained(os.path.join(folder, 'unet'))
    diffusers.AutoencoderKL(block_out_channels=(8, 16), down_block_types=('DownEncoderBlock2D',) * 2, up_block_types=('UpDecoderBlock2D',) * 2,
        latent_channels=4, norm_num_groups=8, layers_per_block=1, sample_size=16).save_pretrained(os.path.join(folder, 'vae'))
    diffusers.PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule='scaled_linear', skip_prk_steps=True, steps_offset=1,
        set_alpha_to_one=False).save_pretrained(os.path.join(folder, 'scheduler'))
    # CLIP BPE files: letters alone and word-final ('</w>'), merges building 'cat</w>' and 'dog</w>', special tokens.
    letters = 'abcdefghijklmnopqrstuvwxyz'
    tokens = list(letters) + [c + '</w>' for c in letters] + ['ca', 'cat</w>', 'do', 'dog</w>', '<|startoftext|>', '<|endoftext|>']
    os.makedirs(os.path.join(folder, 'tokenizer'))
    with open(os.path.join(folder, 'tokenizer', 'vocab.json'), 'w') as f:
        json.dump({token: i for i, token in enumerate(tokens)}, f)
    with open(os.path.join(folder, 'tokenizer', 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\nc a\nca t</w>\nd o\ndo g</w>\n')
    tokenizer = transformers.CLIPTokenizer(os.path.join(folder, 'tokenizer', 'vocab.json'), os.path.join(folder, 'tokenizer', 'merges.txt'), model_max_length=77)
    tokenizer.save_pretrained(os.path.join(folder, 'tokenizer'))
    config = transformers.CLIPTextConfig(vocab_size=1000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, bos_token_id=len(tokens) - 2, eos_token_id=len(tokens) - 1, pad_token_id=len(tokens) - 1)
    transformers.CLIPTextModel(config).save_pretrained(os.path.join(folder, 'text_encoder'))
    return unet

@pytest.fixture(scope='module')
def tiny_sd(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp('tiny-sd'))
    return folder, write_tiny_sd_folder(folder)

def test_load_sd_tiny_folder(tiny_sd):
    folder, ref = tiny_sd
    sd = load_sd(folder)
    assert sd['unet_config'] == dict(TINY, in_channels=4, out_channels=4, norm_eps=1e-5, flip_sin_to_cos=True, freq_shift=0)
    assert isinstance(sd['unet'], SDUNet) and SDUNet(**sd['unet_config']).state_dict().keys() == sd['unet'].state_dict().keys()
    ids = sd['tokenizer'](['a cat'], padding='max_length', max_length=77).input_ids[0]
    assert ids[:4] == [sd['tokenizer'].bos_token_id, 26, 53, sd['tokenizer'].eos_token_id] # <start> a</w> cat</w> <end>
    ctx = encode_prompts(sd['tokenizer'], sd['text_encoder'], ['a cat', 'a dog'])
    assert ctx.shape == (2, 77, 32) and not torch.allclose(ctx[0], ctx[1])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    latents = vae_encode(sd['vae'], images)
    assert latents.shape == (2, 4, 8, 8)
    assert torch.allclose(latents, sd['vae'].encode(images).latent_dist.mean * 0.18215, atol=1e-6)
    decoded = vae_decode(sd['vae'], latents)
    assert decoded.shape == (2, 3, 16, 16) and decoded.abs().max() <= 1
    with torch.no_grad():
        assert torch.allclose(sd['unet'](latents, 999, ctx), ref(latents, 999, ctx).sample, atol=1e-5)

def test_load_sd_errors_name_the_problem(tiny_sd, tmp_path):
    folder = str(tmp_path / 'sd')
    shutil.copytree(tiny_sd[0], folder)
    os.remove(os.path.join(folder, 'text_encoder', 'model.safetensors'))
    with pytest.raises(FileNotFoundError, match='text_encoder/model.safetensors not found; a diffusers-format SD v1.5 folder') as error:
        load_sd(folder)
    assert '\n' not in str(error.value)
    shutil.rmtree(folder)
    shutil.copytree(tiny_sd[0], folder)

    def edit(name, **changes):
        path = os.path.join(folder, name)
        with open(path) as f:
            config = json.load(f)
        with open(path, 'w') as f:
            json.dump(config | changes, f)
    edit('scheduler/scheduler_config.json', beta_schedule='linear')
    with pytest.raises(ValueError, match='beta_schedule'):
        load_sd(folder)
    edit('scheduler/scheduler_config.json', beta_schedule='scaled_linear')
    edit('unet/config.json', use_linear_projection=True)
    with pytest.raises(ValueError, match='use_linear_projection=True is not supported'):
        load_sd(folder)
    edit('unet/config.json', use_linear_projection=False, layers_per_block=2)
    with pytest.raises(ValueError, match='does not fit SDUNet') as error:
        load_sd(folder)
    assert '\n' not in str(error.value)
    edit('unet/config.json', layers_per_block=1)
    for name in ('vae/diffusion_pytorch_model.safetensors', 'text_encoder/model.safetensors'):       # truncated weights
        path = os.path.join(folder, name)
        intact = open(path, 'rb').read()
        with open(path, 'wb') as f:
            f.write(intact[:len(intact) // 2])
        with pytest.raises(ValueError, match=f'{os.path.dirname(path)} cannot be loaded') as error:
            load_sd(folder)
        assert '\n' not in str(error.value)
        with open(path, 'wb') as f:
            f.write(intact)
    load_sd(folder)

#----------------------------------------------------------------------------

# The sample grid decodes in chunks of at most VAE_DECODE_BATCH latents, and the images are those of one call.
def test_vae_decode_in_bounded_chunks_equals_one_call(tiny_sd):
    vae = load_sd(tiny_sd[0])['vae']
    latents = torch.randn(10, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    sizes = []
    decode = vae.decode
    vae.decode = lambda z, *args, **kwargs: sizes.append(len(z)) or decode(z, *args, **kwargs)
    chunked = vae_decode(vae, latents, batch=4)
    default = vae_decode(vae, latents[:sd_unet.VAE_DECODE_BATCH + 1])
    vae.decode = decode
    assert sizes == [4, 4, 2, sd_unet.VAE_DECODE_BATCH, 1]
    with torch.no_grad():
        one_call = vae.decode(latents / vae.config.scaling_factor).sample.float().clamp(-1, 1)
    # Per-image layers (GroupNorm, convolutions, per-image attention): only the kernels' summation order may change with
    # the batch. Each output sums <= 9 * 16 products a convolution, over 16 convolutions, |activations| ~1: 16 * 144 * eps.
    tol = 16 * 9 * 16 * torch.finfo(torch.float32).eps
    torch.testing.assert_close(chunked, one_call, atol=tol, rtol=0)
    torch.testing.assert_close(default, one_call[:sd_unet.VAE_DECODE_BATCH + 1], atol=tol, rtol=0)
