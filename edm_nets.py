"""EDM teachers (Karras et al. 2022), weight-compatible with NVIDIA's released pickles, plus the
one-step generator, the Heun sampler, and the exported generator's files (NVIDIA's pickles: edm_pickle.py).

Module names, constructor arguments and state-dict keys follow NVlabs/edm `training/networks.py`, so
`load_state_dict(..., strict=True)` works with the released weights."""

import contextlib
import copy
import inspect
import json
import os

import numpy as np
import torch
from torch.nn.functional import silu

#----------------------------------------------------------------------------
# Weight initialisation shared by all layers (Glorot / He, uniform or normal).

def weight_init(shape, mode, fan_in, fan_out):
    variance = {
        'xavier_uniform':  6 / (fan_in + fan_out),
        'xavier_normal':   2 / (fan_in + fan_out),
        'kaiming_uniform': 3 / fan_in,
        'kaiming_normal':  1 / fan_in,
    }
    if mode not in variance:
        raise ValueError(f'Invalid init mode "{mode}"')
    noise = torch.rand(*shape) * 2 - 1 if mode.endswith('uniform') else torch.randn(*shape)
    return np.sqrt(variance[mode]) * noise

#----------------------------------------------------------------------------
# Fully-connected layer. Parameters stay fp32 and are cast to the activation dtype.

class Linear(torch.nn.Module):
    def __init__(self, in_features, out_features, bias=True, init_mode='kaiming_normal', init_weight=1, init_bias=0):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        self.weight = torch.nn.Parameter(weight_init([out_features, in_features], **fans) * init_weight)
        self.bias = torch.nn.Parameter(weight_init([out_features], **fans) * init_bias) if bias else None

    def forward(self, x):
        x = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype))
        return x

#----------------------------------------------------------------------------
# Convolution with optional 2x up/downsampling by a separable FIR filter.
# kernel=0 gives a pure resampling layer without weights.

class Conv2d(torch.nn.Module):
    def __init__(self,
        in_channels,                        # Number of input channels.
        out_channels,                       # Number of output channels.
        kernel,                             # Kernel size, 0 = no convolution (resampling only).
        bias            = True,             # Add a learned bias?
        up              = False,            # Upsample 2x before the convolution?
        down            = False,            # Downsample 2x before the convolution?
        resample_filter = [1,1],            # 1D low-pass filter taps used for resampling.
        fused_resample  = False,            # Fuse resampling with the convolution (NCSN++ residual encoder)?
        init_mode       = 'kaiming_normal', # Weight initialisation, see weight_init().
        init_weight     = 1,                # Weight init multiplier.
        init_bias       = 0,                # Bias init multiplier.
    ):
        if up and down:
            raise ValueError('Conv2d cannot both upsample and downsample')
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels*kernel*kernel, fan_out=out_channels*kernel*kernel)
        self.weight = torch.nn.Parameter(weight_init([out_channels, in_channels, kernel, kernel], **fans) * init_weight) if kernel else None
        self.bias = torch.nn.Parameter(weight_init([out_channels], **fans) * init_bias) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        f = torch.outer(f, f)[None, None] / f.sum().square() # 2D filter with unit DC gain
        self.register_buffer('resample_filter', f if up or down else None)

    def forward(self, x):
        F = torch.nn.functional
        w = self.weight.to(x.dtype) if self.weight is not None else None
        b = self.bias.to(x.dtype) if self.bias is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0

        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=w_pad+f_pad)
            x = F.conv2d(x, w)
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad+f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if b is not None:
            x = x.add_(b.reshape(1, -1, 1, 1))
        return x

#----------------------------------------------------------------------------
# Group normalisation with at least `min_channels_per_group` channels per group.

class GroupNorm(torch.nn.Module):
    def __init__(self, num_channels, num_groups=32, min_channels_per_group=4, eps=1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.ones(num_channels))
        self.bias = torch.nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return torch.nn.functional.group_norm(x, num_groups=self.num_groups, weight=self.weight.to(x.dtype), bias=self.bias.to(x.dtype), eps=self.eps)

#----------------------------------------------------------------------------
# U-Net residual block with optional up/downsampling and self-attention: the union of the
# DDPM++, NCSN++ and ADM blocks.

class UNetBlock(torch.nn.Module):
    def __init__(self,
        in_channels,                        # Number of input channels.
        out_channels,                       # Number of output channels.
        emb_channels,                       # Size of the noise/label embedding vector.
        up                  = False,        # Upsample 2x?
        down                = False,        # Downsample 2x?
        attention           = False,        # Append a self-attention layer?
        num_heads           = None,         # Attention heads, None = out_channels // channels_per_head.
        channels_per_head   = 64,           # Channels per head when num_heads is None.
        dropout             = 0,            # Dropout probability before the second convolution.
        skip_scale          = 1,            # Scale applied after each residual sum.
        eps                 = 1e-5,         # GroupNorm epsilon.
        resample_filter     = [1,1],        # Resampling filter taps.
        resample_proj       = False,        # Use a 1x1 conv on the skip path even if channels match?
        adaptive_scale      = True,         # Embedding gives scale and shift (ADM) instead of a shift.
        init                = dict(),       # Init kwargs for most layers.
        init_zero           = dict(init_weight=0), # Init kwargs for the last layer of each branch.
        init_attn           = None,         # Init kwargs for the qkv layer, None = init.
    ):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        self.num_heads = 0 if not attention else num_heads if num_heads is not None else out_channels // channels_per_head
        self.dropout = dropout
        self.skip_scale = skip_scale
        self.adaptive_scale = adaptive_scale

        self.norm0 = GroupNorm(num_channels=in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(in_features=emb_channels, out_features=out_channels*(2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(num_channels=out_channels, eps=eps)
        self.conv1 = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=3, **init_zero)

        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels=in_channels, out_channels=out_channels, kernel=kernel, up=up, down=down, resample_filter=resample_filter, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(num_channels=out_channels, eps=eps)
            self.qkv = Conv2d(in_channels=out_channels, out_channels=out_channels*3, kernel=1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=1, **init_zero)

    def forward(self, x, emb):
        orig = x
        x = self.conv0(silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = silu(self.norm1(x.add_(params)))

        x = self.conv1(torch.nn.functional.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            # qkv channels are laid out [head, channel, (q,k,v)], as in EDM; softmax(q^T k / sqrt(c)) v.
            # SDPA gets [batch, head, pixel, channel] with channels contiguous (one copy), the layout the fused
            # kernels (flash, memory-efficient, cuDNN) accept; strided channels fall back to the math kernel.
            B, C, H, W = x.shape
            qkv = self.qkv(self.norm2(x)).reshape(B, self.num_heads, C // self.num_heads, 3, H * W)
            q, k, v = qkv.permute(3, 0, 1, 4, 2).contiguous().unbind(0)
            a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
            x = self.proj(a.transpose(2, 3).reshape(B, C, H, W)).add_(x)
            x = x * self.skip_scale
        return x

#----------------------------------------------------------------------------
# Sinusoidal timestep embedding (DDPM++ and ADM).

class PositionalEmbedding(torch.nn.Module):
    def __init__(self, num_channels, max_positions=10000, endpoint=False):
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x):
        half = self.num_channels // 2
        freqs = torch.arange(half, dtype=torch.float32, device=x.device) / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# Random Fourier feature timestep embedding (NCSN++).

class FourierEmbedding(torch.nn.Module):
    def __init__(self, num_channels, scale=16):
        super().__init__()
        self.register_buffer('freqs', torch.randn(num_channels // 2) * scale)

    def forward(self, x):
        x = torch.outer(x, (2 * np.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)

#----------------------------------------------------------------------------
# What runs after the deepest tapped encoder block (the feature tap of EDMPrecond.forward_features):
# 'grad' the rest of the U-Net as usual; 'no_grad' the rest without autograd, so D(x) costs no stored
# activations while the features keep their graph; 'skip' nothing, the pass stops there (D(x) is None).

DECODER_MODES = ('grad', 'no_grad', 'skip')

def last_tap(enc, taps):
    names = [name for name in enc if taps is not None and name in taps]
    return names[-1] if names else None

#----------------------------------------------------------------------------
# DDPM++ / NCSN++ U-Net of Song et al. 2021, as re-implemented in EDM.
# `taps` (a dict of encoder block names) is filled in place with those blocks' outputs; `decoder` as above.

class SongUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.

        model_channels      = 128,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,2,2],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 4,            # Number of residual blocks per resolution.
        attn_resolutions    = [16],         # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels for classifier-free guidance.

        embedding_type      = 'positional', # Timestep embedding: 'positional' for DDPM++, 'fourier' for NCSN++.
        channel_mult_noise  = 1,            # Timestep embedding size: 1 for DDPM++, 2 for NCSN++.
        encoder_type        = 'standard',   # Encoder: 'standard' for DDPM++, 'residual' for NCSN++, or 'skip'.
        decoder_type        = 'standard',   # Decoder: 'standard' for DDPM++ and NCSN++, or 'skip'.
        resample_filter     = [1,1],        # Resampling filter: [1,1] for DDPM++, [1,3,3,1] for NCSN++.
    ):
        if embedding_type not in ('fourier', 'positional'): raise ValueError(f'embedding_type "{embedding_type}"')
        if encoder_type not in ('standard', 'skip', 'residual'): raise ValueError(f'encoder_type "{encoder_type}"')
        if decoder_type not in ('standard', 'skip'): raise ValueError(f'decoder_type "{decoder_type}"')
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode='xavier_uniform')
        init_zero = dict(init_mode='xavier_uniform', init_weight=1e-5)
        init_attn = dict(init_mode='xavier_uniform', init_weight=np.sqrt(0.2))
        block_kwargs = dict(
            emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=np.sqrt(0.5), eps=1e-6,
            resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
            init=init, init_zero=init_zero, init_attn=init_attn,
        )

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=noise_channels, endpoint=True) if embedding_type == 'positional' else FourierEmbedding(num_channels=noise_channels)
        self.map_label = Linear(in_features=label_dim, out_features=noise_channels, **init) if label_dim else None
        self.map_augment = Linear(in_features=augment_dim, out_features=noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(in_features=noise_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)

        # Encoder. 'aux' layers carry the downsampled input image (skip) or a residual path (residual).
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
                if encoder_type == 'skip':
                    self.enc[f'{res}x{res}_aux_down'] = Conv2d(in_channels=caux, out_channels=caux, kernel=0, down=True, resample_filter=resample_filter)
                    self.enc[f'{res}x{res}_aux_skip'] = Conv2d(in_channels=caux, out_channels=cout, kernel=1, **init)
                if encoder_type == 'residual':
                    self.enc[f'{res}x{res}_aux_residual'] = Conv2d(in_channels=caux, out_channels=cout, kernel=3, down=True, resample_filter=resample_filter, fused_resample=True, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for name, block in self.enc.items() if 'aux' not in name]

        # Decoder. Each level ends with num_blocks+1 blocks that consume the encoder skips in reverse.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(idx == num_blocks and res in attn_resolutions), **block_kwargs)
            if decoder_type == 'skip' or level == 0:
                if decoder_type == 'skip' and level < len(channel_mult) - 1:
                    self.dec[f'{res}x{res}_aux_up'] = Conv2d(in_channels=out_channels, out_channels=out_channels, kernel=0, up=True, resample_filter=resample_filter)
                self.dec[f'{res}x{res}_aux_norm'] = GroupNorm(num_channels=cout, eps=1e-6)
                self.dec[f'{res}x{res}_aux_conv'] = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, taps=None, decoder='grad'):
        with contextlib.ExitStack() as rest:
            return self._forward(x, noise_labels, class_labels, augment_labels, taps, decoder, rest)

    def _forward(self, x, noise_labels, class_labels, augment_labels, taps, decoder, rest):
        stop = last_tap(self.enc, taps)
        # Mapping.
        emb = self.map_noise(noise_labels)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(*emb.shape) # swap cos/sin halves, as score_sde
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = labels * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(labels.dtype)
            emb = emb + self.map_label(labels * np.sqrt(self.map_label.in_features))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = silu(self.map_layer1(emb))

        # Encoder.
        skips = []
        aux = x
        for name, block in self.enc.items():
            if 'aux_down' in name:
                aux = block(aux)
            elif 'aux_skip' in name:
                x = skips[-1] = x + block(aux)
            elif 'aux_residual' in name:
                x = skips[-1] = aux = (x + block(aux)) / np.sqrt(2)
            else:
                x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
                skips.append(x)
            if taps is not None and name in taps:
                taps[name] = x
            if name == stop and decoder == 'skip':
                return None
            if name == stop and decoder == 'no_grad':
                rest.enter_context(torch.no_grad())

        # Decoder.
        aux = None
        tmp = None
        for name, block in self.dec.items():
            if 'aux_up' in name:
                aux = block(aux)
            elif 'aux_norm' in name:
                tmp = block(x)
            elif 'aux_conv' in name:
                tmp = block(silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != block.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return aux

#----------------------------------------------------------------------------
# ADM U-Net of Dhariwal & Nichol 2021, as re-implemented in EDM.
# `taps` (a dict of encoder block names) is filled in place with those blocks' outputs; `decoder` as above.

class DhariwalUNet(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution at input/output.
        in_channels,                        # Number of color channels at input.
        out_channels,                       # Number of color channels at output.
        label_dim           = 0,            # Number of class labels, 0 = unconditional.
        augment_dim         = 0,            # Augmentation label dimensionality, 0 = no augmentation.

        model_channels      = 192,          # Base multiplier for the number of channels.
        channel_mult        = [1,2,3,4],    # Per-resolution multipliers for the number of channels.
        channel_mult_emb    = 4,            # Multiplier for the dimensionality of the embedding vector.
        num_blocks          = 3,            # Number of residual blocks per resolution.
        attn_resolutions    = [32,16,8],    # List of resolutions with self-attention.
        dropout             = 0.10,         # Dropout probability of intermediate activations.
        label_dropout       = 0,            # Dropout probability of class labels for classifier-free guidance.
    ):
        super().__init__()
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode='kaiming_uniform', init_weight=np.sqrt(1/3), init_bias=np.sqrt(1/3))
        init_zero = dict(init_mode='kaiming_uniform', init_weight=0, init_bias=0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        # Mapping.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = Linear(in_features=augment_dim, out_features=model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(in_features=model_channels, out_features=emb_channels, **init)
        self.map_layer1 = Linear(in_features=emb_channels, out_features=emb_channels, **init)
        self.map_label = Linear(in_features=label_dim, out_features=emb_channels, bias=False, init_mode='kaiming_normal', init_weight=np.sqrt(label_dim)) if label_dim else None

        # Encoder.
        self.enc = torch.nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_conv'] = Conv2d(in_channels=cin, out_channels=cout, kernel=3, **init)
            else:
                self.enc[f'{res}x{res}_down'] = UNetBlock(in_channels=cout, out_channels=cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin = cout
                cout = model_channels * mult
                self.enc[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        skips = [block.out_channels for block in self.enc.values()]

        # Decoder.
        self.dec = torch.nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f'{res}x{res}_in0'] = UNetBlock(in_channels=cout, out_channels=cout, attention=True, **block_kwargs)
                self.dec[f'{res}x{res}_in1'] = UNetBlock(in_channels=cout, out_channels=cout, **block_kwargs)
            else:
                self.dec[f'{res}x{res}_up'] = UNetBlock(in_channels=cout, out_channels=cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin = cout + skips.pop()
                cout = model_channels * mult
                self.dec[f'{res}x{res}_block{idx}'] = UNetBlock(in_channels=cin, out_channels=cout, attention=(res in attn_resolutions), **block_kwargs)
        self.out_norm = GroupNorm(num_channels=cout)
        self.out_conv = Conv2d(in_channels=cout, out_channels=out_channels, kernel=3, **init_zero)

    def forward(self, x, noise_labels, class_labels, augment_labels=None, taps=None, decoder='grad'):
        with contextlib.ExitStack() as rest:
            return self._forward(x, noise_labels, class_labels, augment_labels, taps, decoder, rest)

    def _forward(self, x, noise_labels, class_labels, augment_labels, taps, decoder, rest):
        stop = last_tap(self.enc, taps)
        # Mapping.
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                labels = labels * (torch.rand([x.shape[0], 1], device=x.device) >= self.label_dropout).to(labels.dtype)
            emb = emb + self.map_label(labels)
        emb = silu(emb)

        # Encoder.
        skips = []
        for name, block in self.enc.items():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
            if taps is not None and name in taps:
                taps[name] = x
            if name == stop and decoder == 'skip':
                return None
            if name == stop and decoder == 'no_grad':
                rest.enter_context(torch.no_grad())

        # Decoder.
        for block in self.dec.values():
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(silu(self.out_norm(x)))

#----------------------------------------------------------------------------
# EDM preconditioning (EDM Table 1, Eq. 7): D(x; sigma) = c_skip x + c_out F(c_in x; c_noise).
# `init_kwargs` holds every constructor argument, so EDMPrecond(**net.init_kwargs) rebuilds the net.

class EDMPrecond(torch.nn.Module):
    def __init__(self,
        img_resolution,                     # Image resolution.
        img_channels,                       # Number of color channels.
        label_dim       = 0,                # Number of class labels, 0 = unconditional.
        use_fp16        = False,            # Run the U-Net in fp16 (CUDA only)?
        sigma_min       = 0,                # Minimum supported noise level.
        sigma_max       = float('inf'),     # Maximum supported noise level.
        sigma_data      = 0.5,              # Expected standard deviation of the training data.
        model_type      = 'DhariwalUNet',   # 'SongUNet' or 'DhariwalUNet'.
        **model_kwargs,                     # Keyword arguments for the U-Net.
    ):
        if model_type not in MODEL_TYPES:
            raise ValueError(f'model_type must be one of {sorted(MODEL_TYPES)}, got "{model_type}"')
        super().__init__()
        self.init_kwargs = copy.deepcopy(dict(img_resolution=img_resolution, img_channels=img_channels, label_dim=label_dim,
            use_fp16=use_fp16, sigma_min=sigma_min, sigma_max=sigma_max, sigma_data=sigma_data, model_type=model_type, **model_kwargs))
        self.img_resolution = img_resolution
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.use_fp16 = use_fp16
        self.sigma_min = sigma_min
        self.sigma_max = sigma_max
        self.sigma_data = sigma_data
        self.model = MODEL_TYPES[model_type](img_resolution=img_resolution, in_channels=img_channels, out_channels=img_channels, label_dim=label_dim, **model_kwargs)

    def forward(self, x, sigma, class_labels=None, force_fp32=False, **model_kwargs):
        x = x.to(torch.float32)
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1, 1, 1, 1)
        if self.label_dim == 0:
            class_labels = None
        elif class_labels is None:
            class_labels = torch.zeros([1, self.label_dim], device=x.device)
        else:
            class_labels = class_labels.to(torch.float32).reshape(-1, self.label_dim)
        dtype = torch.float16 if (self.use_fp16 and not force_fp32 and x.device.type == 'cuda') else torch.float32

        c_skip = self.sigma_data ** 2 / (sigma ** 2 + self.sigma_data ** 2)
        c_out = sigma * self.sigma_data / (sigma ** 2 + self.sigma_data ** 2).sqrt()
        c_in = 1 / (self.sigma_data ** 2 + sigma ** 2).sqrt()
        c_noise = sigma.log() / 4

        F_x = self.model((c_in * x).to(dtype), c_noise.flatten(), class_labels=class_labels, **model_kwargs)
        if F_x is None:                                 # decoder='skip': the taps are all there is
            return None
        with torch.no_grad() if model_kwargs.get('decoder') == 'no_grad' else contextlib.nullcontext():
            D_x = c_skip * x + c_out * F_x.to(torch.float32)
        return D_x

    # Feature tap for the GAN discriminator (f-distill App. B, Table 5): the output of the last
    # encoder block at each requested resolution, taken during the same forward pass that gives D_x.
    # decoder='no_grad' (the generator step: D_x is used detached) or 'skip' (the critic step: features
    # only, D_x None) stop autograd or the pass after the deepest tapped block; the values are unchanged.
    def forward_features(self, x, sigma, class_labels=None, resolutions=(8,), force_fp32=False, decoder='grad'):
        if decoder not in DECODER_MODES:
            raise ValueError(f'decoder must be one of {DECODER_MODES}, got "{decoder}"')
        names = self.feature_names(resolutions)
        taps = dict.fromkeys(names)
        D_x = self(x, sigma, class_labels, force_fp32=force_fp32, taps=taps, decoder=decoder)
        return D_x, [taps[name].to(torch.float32) for name in names]

    def feature_names(self, resolutions):
        names = []
        for res in resolutions:
            blocks = [name for name in self.model.enc if name.startswith(f'{res}x{res}_block')]
            if not blocks:
                levels = sorted({int(name.split('x')[0]) for name in self.model.enc}, reverse=True)
                raise ValueError(f'No encoder level at {res}x{res}; this network has levels {levels}')
            names.append(blocks[-1])
        return names

def feature_channels(net, resolutions):
    return [net.model.enc[name].out_channels for name in net.feature_names(resolutions)]

MODEL_TYPES = dict(SongUNet=SongUNet, DhariwalUNet=DhariwalUNet)

#----------------------------------------------------------------------------
# One-step generator G(z) = D(sigma_init z; sigma_init), a copy of the teacher (DMD Sec. 3.1).

class OneStepGenerator(torch.nn.Module):
    def __init__(self, net, sigma_init=80.0):
        super().__init__()
        self.net = net
        self.sigma_init = sigma_init

    def forward(self, z, class_labels=None):
        sigma = torch.full([z.shape[0], 1, 1, 1], self.sigma_init, device=z.device)
        return self.net(self.sigma_init * z, sigma, class_labels)

def set_dropout(net, p):
    for module in net.modules():
        if isinstance(module, UNetBlock):
            module.dropout = p
        if isinstance(module, EDMPrecond):
            module.init_kwargs['dropout'] = p
    return net

# Students and fake scores start as trainable copies of the teacher, with dropout off. They are never given
# augmentation labels, so EDM's map_augment (CIFAR-10's teacher has one) stays frozen at the teacher's weights:
# every trainable parameter gets a gradient in every step, as DDP without find_unused_parameters needs.
def copy_without_dropout(net):
    net = set_dropout(copy.deepcopy(net), 0).train().requires_grad_(True)
    if net.model.map_augment is not None:
        net.model.map_augment.requires_grad_(False)
    return net

def make_generator(teacher, sigma_init=80.0):
    return OneStepGenerator(copy_without_dropout(teacher), sigma_init=sigma_init)

#----------------------------------------------------------------------------
# EDM sampler (Karras et al. 2022, Alg. 2): Heun's method with optional churn, on the
# time steps of EDM Eq. 5 with t_N = 0. 18 steps = 35 network evaluations.

SAMPLER_PRESETS = {
    'cifar10':    dict(num_steps=18),
    'imagenet64': dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003), # EDM's ImageNet-64 setting, NFE = 511
}

def sigma_steps(num_steps=18, sigma_min=0.002, sigma_max=80, rho=7):
    i = torch.arange(num_steps, dtype=torch.float64)
    t = (sigma_max ** (1 / rho) + i / max(num_steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho # EDM Eq. 5
    return torch.cat([t, torch.zeros(1, dtype=torch.float64)])

def edm_sampler(
    net, latents, class_labels=None, randn_like=torch.randn_like, *,
    num_steps=18, sigma_min=0.002, sigma_max=80, rho=7,
    S_churn=0, S_min=0, S_max=float('inf'), S_noise=1,
):
    sigma_min = max(sigma_min, net.sigma_min)
    sigma_max = min(sigma_max, net.sigma_max)
    t_steps = sigma_steps(num_steps, sigma_min, sigma_max, rho).to(latents.device)

    x_next = latents.to(torch.float64) * t_steps[0]                                      # Alg. 2 line 2
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        gamma = min(S_churn / num_steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0 # Alg. 2 line 4
        t_hat = t_cur + gamma * t_cur                                                     # Alg. 2 line 6
        x_hat = x_cur + (t_hat ** 2 - t_cur ** 2).sqrt() * S_noise * randn_like(x_cur)   # Alg. 2 lines 5, 7
        d_cur = (x_hat - net(x_hat, t_hat, class_labels).to(torch.float64)) / t_hat       # Alg. 2 line 8
        x_next = x_hat + (t_next - t_hat) * d_cur                                         # Alg. 2 line 9
        if i < num_steps - 1:                                                             # Alg. 2 lines 10-12
            d_prime = (x_next - net(x_next, t_next, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next

# One torch.Generator per image, so image i depends only on seed i, not on the batch it is in.
class StackedRandomGenerator:
    def __init__(self, device, seeds):
        self.generators = [torch.Generator(device).manual_seed(int(seed) % (1 << 32)) for seed in seeds]

    def randn(self, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randn(size[1:], generator=gen, **kwargs) for gen in self.generators])

    def randn_like(self, input):
        return self.randn(input.shape, dtype=input.dtype, layout=input.layout, device=input.device)

    def randint(self, *args, size, **kwargs):
        assert size[0] == len(self.generators)
        return torch.stack([torch.randint(*args, size=size[1:], generator=gen, **kwargs) for gen in self.generators])

#----------------------------------------------------------------------------
# An exported one-step generator, for use outside this repository (evaluate.py export): generator.safetensors
# holds the EDMPrecond state dict (the keys of NVIDIA's networks), generator.json its constructor arguments
# (those that differ from EDMPrecond's defaults, as EDM's own _init_kwargs) and sigma_init (generator_spec). No pickle.

def generator_spec(generator, info=None):
    defaults = {k: p.default for k, p in inspect.signature(EDMPrecond.__init__).parameters.items() if p.default is not p.empty}
    kwargs = {k: v for k, v in generator.net.init_kwargs.items() if k not in defaults or v != defaults[k]}
    return dict(kwargs=kwargs, sigma_init=float(generator.sigma_init), **(info or {}))

def load_generator(folder):
    import safetensors.torch
    paths = [os.path.join(folder, name) for name in ('generator.json', 'generator.safetensors')]
    for path in paths:
        if not os.path.isfile(path):
            raise FileNotFoundError(f'{path} not found: pass a folder written by `python evaluate.py export --ckpt RUN --dest FOLDER`')
    with open(paths[0]) as f:
        spec = json.load(f)
    with torch.device('meta'):
        net = EDMPrecond(**spec['kwargs'])
    net.load_state_dict(safetensors.torch.load_file(paths[1]), strict=True, assign=True)
    return OneStepGenerator(net, spec['sigma_init']).eval().requires_grad_(False)

#----------------------------------------------------------------------------
