# Stable Diffusion v1.5 in our own words, for one-step text-to-image distillation:
# the UNet (state dict identical to diffusers' UNet2DConditionModel, so the released weights load
# strictly), SD's discrete DDPM schedule with the eps <-> x0 <-> score <-> EDM-denoiser conversions,
# classifier-free guidance, the one-step generator, a DDIM teacher sampler, and offline loading of a
# local diffusers-format model folder (VAE and CLIP text encoder through diffusers/transformers).

import contextlib
import json
import math
import os
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import checkpoint

#----------------------------------------------------------------------------
# Timestep embedding: DDPM sinusoidal features, then a two-layer SiLU MLP.

def timestep_features(t, dim, flip_sin_to_cos=True, freq_shift=0, max_period=10000):
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift))
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()], dim=1)

class TimestepEmbedding(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.linear_1 = nn.Linear(in_features, out_features)
        self.linear_2 = nn.Linear(out_features, out_features)

    def forward(self, x):
        return self.linear_2(F.silu(self.linear_1(x)))

#----------------------------------------------------------------------------
# Gradient checkpointing: recompute a block's activations in the backward pass instead of storing them.

# The recomputation uses the attention kernels the forward used (R1 runs its forward with the math kernel,
# the only one with a double backward), or the recomputed tensors would not match the saved ones.

def maybe_checkpoint(enabled, fn, *args):
    if enabled and torch.is_grad_enabled():
        backends = enabled_sdpa_backends()
        return checkpoint(fn, *args, use_reentrant=False, context_fn=lambda: (contextlib.nullcontext(), SDPAKernels(backends)))
    return fn(*args)

class SDPAKernels:                  # Re-enterable: a double backward recomputes a block twice.
    def __init__(self, backends):
        self.backends, self.stack = backends, []

    def __enter__(self):
        self.stack.append(sdpa_kernel(self.backends))
        self.stack[-1].__enter__()

    def __exit__(self, *exc):
        return self.stack.pop().__exit__(*exc)

def enabled_sdpa_backends():
    flags = [(SDPBackend.FLASH_ATTENTION, torch.backends.cuda.flash_sdp_enabled()), (SDPBackend.EFFICIENT_ATTENTION, torch.backends.cuda.mem_efficient_sdp_enabled()),
             (SDPBackend.MATH, torch.backends.cuda.math_sdp_enabled()), (SDPBackend.CUDNN_ATTENTION, torch.backends.cuda.cudnn_sdp_enabled())]
    return [backend for backend, enabled in flags if enabled]

#----------------------------------------------------------------------------
# Residual block (diffusers' ResnetBlock2D as SD uses it: time added after conv1, no dropout, output scale 1).

class ResnetBlock(nn.Module):
    def __init__(self, in_channels, out_channels, emb_channels, groups, eps):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1)
        self.time_emb_proj = nn.Linear(emb_channels, out_channels)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=eps)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1) if in_channels != out_channels else None
        self.gradient_checkpointing = False

    def forward(self, x, emb):
        return maybe_checkpoint(self.gradient_checkpointing, self._forward, x, emb)

    def _forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.time_emb_proj(F.silu(emb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h

#----------------------------------------------------------------------------
# Multi-head attention, GEGLU feed-forward, and the pre-norm transformer block
# (self-attention, cross-attention to the text context, feed-forward).

class Attention(nn.Module):
    def __init__(self, channels, context_channels, heads):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(channels, channels, bias=False)
        self.to_k = nn.Linear(context_channels, channels, bias=False)
        self.to_v = nn.Linear(context_channels, channels, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels)]) # diffusers' to_out.1 is a parameter-free dropout.

    def forward(self, x, context):
        B, N, C = x.shape
        q, k, v = (y.reshape(B, -1, self.heads, C // self.heads).transpose(1, 2) for y in (self.to_q(x), self.to_k(context), self.to_v(context)))
        h = F.scaled_dot_product_attention(q, k, v) # softmax(q k^T / sqrt(head width)) v
        return self.to_out[0](h.transpose(1, 2).reshape(B, N, C))

class GEGLU(nn.Module):
    def __init__(self, in_features, out_features):
        super().__init__()
        self.proj = nn.Linear(in_features, out_features * 2)

    def forward(self, x):
        h, gate = self.proj(x).chunk(2, dim=-1)
        return h * F.gelu(gate)

class FeedForward(nn.Module):
    def __init__(self, channels, mult=4):
        super().__init__()
        # Index 1 is diffusers' dropout (p = 0 in SD); kept as a placeholder so the keys read ff.net.0 / ff.net.2.
        self.net = nn.Sequential(GEGLU(channels, channels * mult), nn.Identity(), nn.Linear(channels * mult, channels))

    def forward(self, x):
        return self.net(x)

class TransformerBlock(nn.Module):
    def __init__(self, channels, context_channels, heads):
        super().__init__()
        self.norm1 = nn.LayerNorm(channels)
        self.attn1 = Attention(channels, channels, heads)
        self.norm2 = nn.LayerNorm(channels)
        self.attn2 = Attention(channels, context_channels, heads)
        self.norm3 = nn.LayerNorm(channels)
        self.ff = FeedForward(channels)

    def forward(self, x, context):
        h = self.norm1(x)
        x = x + self.attn1(h, h)
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))

#----------------------------------------------------------------------------
# Spatial transformer (diffusers' Transformer2DModel with 1x1-conv proj_in/proj_out): the feature map
# is flattened to H*W tokens, run through one transformer block, and added back as a residual.

class SpatialTransformer(nn.Module):
    def __init__(self, channels, context_channels, heads, groups):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-6)
        self.proj_in = nn.Conv2d(channels, channels, kernel_size=1)
        self.transformer_blocks = nn.ModuleList([TransformerBlock(channels, context_channels, heads)])
        self.proj_out = nn.Conv2d(channels, channels, kernel_size=1)
        self.gradient_checkpointing = False

    def forward(self, x, context):
        return maybe_checkpoint(self.gradient_checkpointing, self._forward, x, context)

    def _forward(self, x, context):
        B, C, H, W = x.shape
        h = self.proj_in(self.norm(x)).permute(0, 2, 3, 1).reshape(B, H * W, C)
        for block in self.transformer_blocks:
            h = block(h, context)
        return x + self.proj_out(h.reshape(B, H, W, C).permute(0, 3, 1, 2))

#----------------------------------------------------------------------------
# Resampling: stride-2 3x3 conv down; nearest-neighbour up to the skip's resolution, then 3x3 conv.

class Downsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=1)

    def forward(self, x):
        return self.conv(x)

class Upsample(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, padding=1)

    def forward(self, x, size):
        return self.conv(F.interpolate(x, size=size, mode='nearest'))

#----------------------------------------------------------------------------
# UNet blocks: CrossAttnDownBlock2D / DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D / CrossAttnUpBlock2D.

class DownBlock(nn.Module):
    # resnet(c_in, c_out) and transformer(c) build the layers; transformer is None for DownBlock2D.
    def __init__(self, in_channels, out_channels, num_layers, resnet, transformer, downsample):
        super().__init__()
        self.resnets = nn.ModuleList([resnet(in_channels if i == 0 else out_channels, out_channels) for i in range(num_layers)])
        self.attentions = nn.ModuleList([transformer(out_channels) for _ in range(num_layers)]) if transformer else None
        self.downsamplers = nn.ModuleList([Downsample(out_channels)]) if downsample else None

    def forward(self, x, emb, context):
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips

class MidBlock(nn.Module):
    def __init__(self, channels, resnet, transformer):
        super().__init__()
        self.resnets = nn.ModuleList([resnet(channels, channels) for _ in range(2)])
        self.attentions = nn.ModuleList([transformer(channels)])

    def forward(self, x, emb, context):
        x = self.resnets[0](x, emb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, emb)

class UpBlock(nn.Module):
    # Layer i sees cat(x, skip): x has prev_channels (from the level below) for i = 0, out_channels after; the
    # skips are this encoder level's outputs (out_channels) and, last, the level above's downsampled output
    # (conv_in's at the top), which has in_channels.
    def __init__(self, in_channels, prev_channels, out_channels, num_layers, resnet, transformer, upsample):
        super().__init__()
        x_channels = [prev_channels] + [out_channels] * (num_layers - 1)
        skip_channels = [out_channels] * (num_layers - 1) + [in_channels]
        self.resnets = nn.ModuleList([resnet(c_x + c_skip, out_channels) for c_x, c_skip in zip(x_channels, skip_channels)])
        self.attentions = nn.ModuleList([transformer(out_channels) for _ in range(num_layers)]) if transformer else None
        self.upsamplers = nn.ModuleList([Upsample(out_channels)]) if upsample else None

    def forward(self, x, skips, emb, context, size):
        for i, (resnet, skip) in enumerate(zip(self.resnets, reversed(skips))):
            x = resnet(torch.cat([x, skip], dim=1), emb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x

#----------------------------------------------------------------------------
# SD v1.5 UNet. Constructor arguments are diffusers' UNet2DConditionModel config fields (SD v1.5 values as
# defaults), and the state dict has exactly its keys and shapes (859,520,964 parameters at the defaults).

class SDUNet(nn.Module):
    def __init__(self,
        sample_size         = 64,                           # Latent resolution (512 px / 8); read by samplers, not by the layers.
        in_channels         = 4,                            # Latent channels in.
        out_channels        = 4,                            # Channels of the eps prediction.
        down_block_types    = ('CrossAttnDownBlock2D',) * 3 + ('DownBlock2D',), # Encoder level kinds, high to low resolution.
        up_block_types      = ('UpBlock2D',) + ('CrossAttnUpBlock2D',) * 3,     # Decoder level kinds, low to high resolution.
        block_out_channels  = (320, 640, 1280, 1280),       # Channels at each level.
        layers_per_block    = 2,                            # Resnets per down block; up blocks have one more.
        cross_attention_dim = 768,                          # Text-context width (CLIP ViT-L/14 hidden size).
        attention_head_dim  = 8,                            # diffusers' name for the NUMBER of heads in SD v1.x; head width = channels / 8.
        norm_num_groups     = 32,                           # GroupNorm groups everywhere.
        norm_eps            = 1e-5,                         # GroupNorm eps of resnets and the output norm (transformers use 1e-6).
        flip_sin_to_cos     = True,                         # Timestep features ordered [cos, sin].
        freq_shift          = 0,                            # Frequencies exp(-ln(1e4) * i / (half - freq_shift)).
    ):
        super().__init__()
        if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
            raise ValueError(f'SDUNet: need one down and one up block type per entry of block_out_channels={tuple(block_out_channels)}')
        if not set(down_block_types) <= {'CrossAttnDownBlock2D', 'DownBlock2D'} or not set(up_block_types) <= {'CrossAttnUpBlock2D', 'UpBlock2D'}:
            raise ValueError(f'SDUNet: unsupported block types {tuple(down_block_types)} / {tuple(up_block_types)}; '
                'down blocks are CrossAttnDownBlock2D or DownBlock2D, up blocks CrossAttnUpBlock2D or UpBlock2D')
        self.sample_size = sample_size
        self.in_channels = in_channels
        self.flip_sin_to_cos = flip_sin_to_cos
        self.freq_shift = freq_shift
        self._gradient_checkpointing = False
        C = list(block_out_channels)
        emb_channels = C[0] * 4
        resnet = lambda c_in, c_out: ResnetBlock(c_in, c_out, emb_channels, norm_num_groups, norm_eps)
        transformer = lambda c: SpatialTransformer(c, cross_attention_dim, attention_head_dim, norm_num_groups)

        self.conv_in = nn.Conv2d(in_channels, C[0], kernel_size=3, padding=1)
        self.time_embedding = TimestepEmbedding(C[0], emb_channels)
        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(down_block_types):
            self.down_blocks.append(DownBlock(C[max(i - 1, 0)], C[i], layers_per_block, resnet,
                transformer if kind == 'CrossAttnDownBlock2D' else None, downsample=(i < len(C) - 1)))
        self.mid_block = MidBlock(C[-1], resnet, transformer)
        R = C[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(up_block_types):
            self.up_blocks.append(UpBlock(R[min(i + 1, len(R) - 1)], R[max(i - 1, 0)], R[i], layers_per_block + 1, resnet,
                transformer if kind == 'CrossAttnUpBlock2D' else None, upsample=(i < len(R) - 1)))
        self.conv_norm_out = nn.GroupNorm(norm_num_groups, C[0], eps=norm_eps)
        self.conv_out = nn.Conv2d(C[0], out_channels, kernel_size=3, padding=1)

    @property
    def gradient_checkpointing(self):
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled):
        self._gradient_checkpointing = bool(enabled)
        for module in self.modules():
            if isinstance(module, (ResnetBlock, SpatialTransformer)):
                module.gradient_checkpointing = bool(enabled)

    def forward(self, sample, timestep, encoder_hidden_states):
        return self.forward_features(sample, timestep, encoder_hidden_states)[0]

    def forward_features(self, sample, timestep, encoder_hidden_states, decoder='grad'):
        # Returns (eps, {'mid': mid-block output, 'down': [output of each down block]}) from one pass;
        # 'mid' (1280 x 8 x 8 for 64 x 64 latents) is what the discriminator head reads (Table 5: resolution (8)).
        # After the mid block, decoder='no_grad' runs the up blocks without autograd (eps detached, features
        # keep their graph) and 'skip' stops (eps None): the values are those of the full pass.
        if decoder not in ('grad', 'no_grad', 'skip'):
            raise ValueError(f'decoder must be grad, no_grad or skip, got "{decoder}"')
        t = torch.as_tensor(timestep, device=sample.device).reshape(-1).expand(sample.shape[0])
        emb = self.time_embedding(timestep_features(t, self.conv_in.out_channels, self.flip_sin_to_cos, self.freq_shift).to(sample.dtype))
        x = self.conv_in(sample)
        skips, down = [x], []
        for block in self.down_blocks:
            x, block_skips = block(x, emb, encoder_hidden_states)
            skips += block_skips
            down.append(x)
        x = mid = self.mid_block(x, emb, encoder_hidden_states)
        if decoder == 'skip':
            return None, dict(mid=mid, down=down)
        with torch.no_grad() if decoder == 'no_grad' else contextlib.nullcontext():
            for block in self.up_blocks: # Each takes its skips off the end; it upsamples to the next skip's size (2x, or odd sizes back).
                n = len(block.resnets)
                block_skips, skips = skips[-n:], skips[:-n]
                x = block(x, block_skips, emb, encoder_hidden_states, size=skips[-1].shape[-2:] if skips else None)
            eps = self.conv_out(F.silu(self.conv_norm_out(x)))
        return eps, dict(mid=mid, down=down)

#----------------------------------------------------------------------------
# SD v1.5 noise schedule: discrete DDPM, x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps for t = 0..999,
# "scaled_linear" betas. Its EDM view: x_t = sqrt(abar_t) (x0 + sigma_t n) with sigma_t = sqrt((1 - abar_t) / abar_t),
# so abar_t = 1 / (1 + sigma_t^2); sigma runs from 0.0292 (t = 0) to 14.61 (t = 999).

NUM_TIMESTEPS = 1000
BETA_START = 0.00085
BETA_END = 0.012
ALPHAS_CUMPROD = torch.cumprod(1 - torch.linspace(BETA_START ** 0.5, BETA_END ** 0.5, NUM_TIMESTEPS, dtype=torch.float64) ** 2, dim=0)
SIGMAS = ((1 - ALPHAS_CUMPROD) / ALPHAS_CUMPROD).sqrt()

def sqrt_alphas(t, x):
    # sqrt(abar_t), sqrt(1 - abar_t) for integer timesteps t (int or [B]), shaped to broadcast against x; float32
    # (float64 for float64 x), so a bf16 eps is converted at full precision.
    t = torch.as_tensor(t, device=x.device).long().reshape(-1, *[1] * (x.ndim - 1))
    abar = ALPHAS_CUMPROD.to(x.device)[t]
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return abar.sqrt().to(dtype), (1 - abar).sqrt().to(dtype)

def add_noise(x0, eps, t): # DDPM Eq. 4: x_t = sqrt(abar) x0 + sqrt(1 - abar) eps
    a, s = sqrt_alphas(t, x0)
    return a * x0 + s * eps

def eps_to_x0(x_t, eps, t):
    a, s = sqrt_alphas(t, x_t)
    return (x_t - s * eps) / a

def sigma_to_timestep(sigma):
    # Fractional timestep: log(sigma_t) interpolated linearly between the 1000 trained levels (exact on them),
    # clamped to [0, 999]. Returns float32 [N] for sigma of any shape with N elements.
    sigma = torch.as_tensor(sigma)
    log_sigmas = SIGMAS.log().to(sigma.device)
    s = sigma.to(log_sigmas).log().reshape(-1).clamp(log_sigmas[0], log_sigmas[-1])
    hi = torch.searchsorted(log_sigmas, s).clamp(1, NUM_TIMESTEPS - 1)
    lo = hi - 1
    return (lo + (s - log_sigmas[lo]) / (log_sigmas[hi] - log_sigmas[lo])).float()

#----------------------------------------------------------------------------
# Classifier-free guidance on eps (Ho & Salimans 2022, with scale = their 1 + w): scale 1 is the conditional
# prediction; the distillation teacher uses 1.75 (Table 5), the 50-step baseline 3 (Table 4).

def cfg_eps(eps_uncond, eps_cond, scale):
    return eps_uncond + scale * (eps_cond - eps_uncond)

#----------------------------------------------------------------------------
# SD as an EDM denoiser D(x; sigma), x = x0 + sigma n (EDM Eq. 2 scale), so f-distill uses SD exactly as it
# uses EDM nets: the UNet sees x_t = x / sqrt(1 + sigma^2) and D(x; sigma) = x - sigma * eps.
# t(sigma) is interpolated, not rounded to the nearest step: D stays continuous in sigma and exact at the 1000 trained levels.

def sd_denoiser(unet, ctx, uncond_ctx=None, cfg=1.0):
    if uncond_ctx is None and cfg != 1:
        raise ValueError(f'sd_denoiser: cfg={cfg} needs uncond_ctx (the empty prompt\'s text context)')

    # decoder as in SDUNet.forward_features: 'skip' returns (None, features) and runs no unconditional pass.
    def D(x, sigma, class_labels=None, return_features=False, decoder='grad'):
        # class_labels is accepted for the EDM call net(x, sigma, class_labels); SD's condition is ctx.
        if class_labels is not None:
            raise ValueError('sd_denoiser: SD is conditioned on the text context given to sd_denoiser, not on class_labels')
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        x_t = x / (1 + sigma ** 2).sqrt()
        t = sigma_to_timestep(sigma)
        eps, features = unet.forward_features(x_t, t, ctx, decoder)
        if eps is None:
            return (None, features) if return_features else None
        with torch.no_grad() if decoder == 'no_grad' else contextlib.nullcontext():
            if uncond_ctx is not None:
                eps = cfg_eps(unet(x_t, t, uncond_ctx.expand_as(ctx)), eps, cfg)
            D_x = x - sigma * eps
        return (D_x, features) if return_features else D_x # features: the conditional pass's
    return D

#----------------------------------------------------------------------------
# One-step generator, the DMD2 SD recipe: noise z ~ N(0, I) is fed as x_T at t = 999 (abar_999 = 0.0047, so
# x_T is almost pure noise) and the eps prediction is converted to x0 = (x_T - sqrt(1 - abar) eps) / sqrt(abar).

class SDGenerator(nn.Module):
    def __init__(self, unet, timestep=NUM_TIMESTEPS - 1):
        super().__init__()
        self.unet = unet
        self.timestep = timestep

    def forward(self, z, ctx):
        return eps_to_x0(z, self.unet(z, self.timestep, ctx), self.timestep)

#----------------------------------------------------------------------------
# Multi-step teacher sampler for baselines: DDIM (Song et al. 2021, Eq. 12, eta = 0) from x_T = latents at
# t = 999 to x0, CFG on eps at every step; deterministic given latents. Timesteps round(1000 - 1000 k / N) - 1,
# k = 0..N-1 (diffusers' "trailing" spacing: 999, 979, ..., 19 for N = 50); the last step lands on x0.
# Defaults: the 50-step, CFG 3 teacher of Table 4.

@torch.no_grad()
def ddim_sample(unet, latents, ctx, uncond_ctx=None, num_steps=50, cfg=3.0):
    if uncond_ctx is None and cfg != 1:
        raise ValueError(f'ddim_sample: cfg={cfg} needs uncond_ctx (the empty prompt\'s text context)')
    timesteps = ((NUM_TIMESTEPS - torch.arange(num_steps, dtype=torch.float64) * (NUM_TIMESTEPS / num_steps)).round().long() - 1).tolist()
    x = latents
    for i, t in enumerate(timesteps):
        eps = unet(x, t, ctx)
        if uncond_ctx is not None:
            eps = cfg_eps(unet(x, t, uncond_ctx.expand_as(ctx)), eps, cfg)
        x0 = eps_to_x0(x, eps, t)
        x = add_noise(x0, eps, timesteps[i + 1]) if i + 1 < num_steps else x0
    return x

#----------------------------------------------------------------------------
# Loading a local diffusers-format SD v1.5 folder, offline. The UNet goes into SDUNet; the VAE and the CLIP
# text encoder/tokenizer use diffusers/transformers (imported inside the functions, so the UNet and the
# schedule need only torch).

SD_FOLDER_FILES = ['unet/config.json', 'unet/diffusion_pytorch_model.safetensors', 'vae/config.json', 'vae/diffusion_pytorch_model.safetensors',
    'text_encoder/config.json', 'text_encoder/model.safetensors', 'tokenizer/vocab.json', 'tokenizer/merges.txt']
SD_FOLDER_HINT = 'a diffusers-format SD v1.5 folder (e.g. a local copy of stable-diffusion-v1-5/stable-diffusion-v1-5) must contain ' + ', '.join(SD_FOLDER_FILES)

SDUNET_FIELDS = ['sample_size', 'in_channels', 'out_channels', 'down_block_types', 'up_block_types', 'block_out_channels', 'layers_per_block',
    'cross_attention_dim', 'attention_head_dim', 'norm_num_groups', 'norm_eps', 'flip_sin_to_cos', 'freq_shift']

# UNet2DConditionModel config fields that SDUNet hard-wires, at the values it implements. Fields that are in
# neither list are ignored: any that changed the layers would fail the strict state-dict load.
SDUNET_FIXED_FIELDS = dict(center_input_sample=False, mid_block_type='UNetMidBlock2DCrossAttn', only_cross_attention=False, downsample_padding=1,
    mid_block_scale_factor=1, dropout=0.0, act_fn='silu', transformer_layers_per_block=1, num_attention_heads=None, dual_cross_attention=False,
    use_linear_projection=False, class_embed_type=None, addition_embed_type=None, num_class_embeds=None, upcast_attention=False,
    resnet_time_scale_shift='default', resnet_skip_time_act=False, resnet_out_scale_factor=1.0, time_embedding_type='positional',
    time_embedding_dim=None, time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3, conv_out_kernel=3,
    encoder_hid_dim=None, encoder_hid_dim_type=None, attention_type='default', cross_attention_norm=None, class_embeddings_concat=False,
    mid_block_only_cross_attention=None, reverse_transformer_layers_per_block=None, projection_class_embeddings_input_dim=None, addition_time_embed_dim=None)

def unet_kwargs_from_config(config, name='unet/config.json'):
    for key, value in SDUNET_FIXED_FIELDS.items():
        if key in config and config[key] != value:
            raise ValueError(f'{name}: {key}={config[key]!r} is not supported by SDUNet (SD v1.x has {value!r})')
    return {key: tuple(config[key]) if isinstance(config[key], list) else config[key] for key in SDUNET_FIELDS if key in config}

def check_scheduler_config(path):
    # SD v1.5 ships scheduler/scheduler_config.json; if present it must describe the schedule hard-wired above.
    with open(path) as f:
        config = json.load(f)
    expected = dict(num_train_timesteps=NUM_TIMESTEPS, beta_start=BETA_START, beta_end=BETA_END, beta_schedule='scaled_linear', prediction_type='epsilon')
    for key, value in expected.items():
        if key in config and not (config[key] == value or (isinstance(value, float) and math.isclose(config[key], value))):
            raise ValueError(f'{path}: {key}={config[key]!r}, but sd_unet.py implements SD v1.5\'s {key}={value!r}')

# A damaged file of the SD folder, however the library reports it, as one line naming its subfolder.
def damaged(subfolder, err):
    detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
    return ValueError(f'{subfolder} cannot be loaded ({type(err).__name__}: {detail}); {SD_FOLDER_HINT}')

def load_sdunet(folder):
    config_path = os.path.join(folder, 'unet', 'config.json')
    weights_path = os.path.join(folder, 'unet', 'diffusion_pytorch_model.safetensors')
    import safetensors.torch
    try:
        with open(config_path) as f:
            config = json.load(f)
        state = safetensors.torch.load_file(weights_path)
    except Exception as err:
        raise damaged(os.path.join(folder, 'unet'), err) from None
    unet_config = unet_kwargs_from_config(config, config_path)
    with torch.device('meta'): # No time spent on a random init that the weights overwrite.
        unet = SDUNet(**unet_config)
    expected = {key: tuple(value.shape) for key, value in unet.state_dict().items()}
    missing = [key for key in expected if key not in state]
    unexpected = [key for key in state if key not in expected]
    mismatched = [f'{key} {tuple(state[key].shape)} vs {shape}' for key, shape in expected.items() if key in state and tuple(state[key].shape) != shape]
    if missing or unexpected or mismatched:
        raise ValueError(f'{weights_path} does not fit SDUNet built from {config_path} (SD v1.x layout expected): '
            f'{len(missing)} missing {missing[:3]}, {len(unexpected)} unexpected {unexpected[:3]}, {len(mismatched)} wrong shape {mismatched[:3]}')
    unet.load_state_dict(state, strict=True, assign=True)
    return unet, unet_config

# The reverse of load_sdunet, for exporting a student: the config.json of a diffusers UNet2DConditionModel folder,
# every field SDUNet hard-wires written out, so that from_pretrained loads it beside the state dict.
def diffusers_unet_config(unet_config):
    return dict(_class_name='UNet2DConditionModel', **SDUNET_FIXED_FIELDS, **{k: list(v) if isinstance(v, tuple) else v for k, v in unet_config.items()})

def load_sd(folder, device='cpu', dtype=torch.float32):
    for name in SD_FOLDER_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f'{os.path.join(folder, name)} not found; {SD_FOLDER_HINT}')
    scheduler_config = os.path.join(folder, 'scheduler', 'scheduler_config.json')
    if os.path.isfile(scheduler_config):
        check_scheduler_config(scheduler_config)
    from diffusers import AutoencoderKL
    from transformers import CLIPTextModel, CLIPTokenizer
    unet, unet_config = load_sdunet(folder)

    def pretrained(load, name, **kwargs):
        try:
            return load(os.path.join(folder, name), local_files_only=True, **kwargs)
        except Exception as err:
            raise damaged(os.path.join(folder, name), err) from None
    vae = pretrained(AutoencoderKL.from_pretrained, 'vae', use_safetensors=True, torch_dtype=dtype)
    text_encoder = pretrained(CLIPTextModel.from_pretrained, 'text_encoder', use_safetensors=True, dtype=dtype)
    tokenizer = pretrained(CLIPTokenizer.from_pretrained, 'tokenizer')
    vae.eval().requires_grad_(False)
    text_encoder.eval().requires_grad_(False)
    return dict(unet=unet.to(device, dtype), vae=vae.to(device), text_encoder=text_encoder.to(device), tokenizer=tokenizer, unet_config=unet_config)

#----------------------------------------------------------------------------
# Text and image encoders around the UNet.

@torch.no_grad()
def encode_prompts(tokenizer, text_encoder, prompts):
    # SD v1.5's context: CLIP's last hidden states for the prompt padded/truncated to 77 tokens, no attention mask.
    ids = tokenizer(list(prompts), padding='max_length', max_length=tokenizer.model_max_length, truncation=True, return_tensors='pt').input_ids
    return text_encoder(ids.to(text_encoder.device))[0]

@torch.no_grad()
def vae_encode(vae, images):
    # Images in [-1, 1] -> latents: the posterior mean (deterministic, so cached latents are reproducible)
    # times scaling_factor (0.18215 for SD v1.5), which brings the latents to roughly unit variance.
    return vae.encode(images.to(vae.device, vae.dtype)).latent_dist.mean * vae.config.scaling_factor

# Latents -> images in [-1, 1], at most `batch` images per decoder call: at 512 px the decoder's activations
# take ~0.6 GiB an image in bf16, so one call on a 64-image grid would add ~40 GiB to the training state.
VAE_DECODE_BATCH = 8

@torch.no_grad()
def vae_decode(vae, latents, batch=VAE_DECODE_BATCH):
    latents = latents.to(vae.device, vae.dtype) / vae.config.scaling_factor
    return torch.cat([vae.decode(chunk).sample.float().clamp(-1, 1) for chunk in latents.split(batch)])

#----------------------------------------------------------------------------
