import copy
import json
import os
import pickle
import sys

import numpy as np
import pytest
import torch

import edm_nets
import edm_pickle
from edm_nets import EDMPrecond
from fixtures import EDMLoss, write_edm_pickle

#----------------------------------------------------------------------------
# Tiny networks covering every architecture option.

SONG_OPTIONS = [ # (embedding_type, channel_mult_noise, encoder_type, decoder_type, resample_filter)
    ('positional', 1, 'standard', 'standard', [1,1]),       # DDPM++
    ('fourier',    2, 'residual', 'standard', [1,3,3,1]),   # NCSN++
    ('positional', 1, 'skip',     'skip',     [1,3,3,1]),
    ('fourier',    1, 'skip',     'standard', [1,1]),
    ('positional', 2, 'residual', 'skip',     [1,1]),
]

def tiny_song(embedding_type='positional', channel_mult_noise=1, encoder_type='standard', decoder_type='standard', resample_filter=[1,1], **kwargs):
    return EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16,
        channel_mult=[1,2,2], num_blocks=1, attn_resolutions=[8], dropout=0.1, embedding_type=embedding_type,
        channel_mult_noise=channel_mult_noise, encoder_type=encoder_type, decoder_type=decoder_type,
        resample_filter=resample_filter, **kwargs)

def tiny_adm(**kwargs):
    return EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, model_type='DhariwalUNet', model_channels=32,
        channel_mult=[1,2], num_blocks=2, attn_resolutions=[8], dropout=0.1, **kwargs)

# EDM zero-initialises the last layer of each branch, which makes D(x) = c_skip x for any input;
# perturb every parameter so that the outputs depend on all weights.
@torch.no_grad()
def randomize(net, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for p in net.parameters():
        p.add_(torch.randn(p.shape, generator=gen) * 0.1 / max(1, p[0].numel()) ** 0.5)
    return net

def inputs(batch=2, label_dim=4, res=16, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn([batch, 3, res, res], generator=gen)
    sigma = torch.tensor([0.3, 5.0, 40.0, 1.0])[:batch]
    labels = torch.eye(label_dim)[torch.arange(batch) % label_dim]
    return x, sigma, labels

@pytest.mark.parametrize('options', SONG_OPTIONS + ['adm'])
def test_tiny_nets_round_trip_strictly_through_state_dict(options):
    net = randomize(tiny_adm() if options == 'adm' else tiny_song(*options)).eval()
    copy_ = EDMPrecond(**json.loads(json.dumps(net.init_kwargs))).eval()
    assert list(copy_.state_dict()) == list(net.state_dict())
    copy_.load_state_dict(net.state_dict(), strict=True)
    x, sigma, labels = inputs()
    out = net(x, sigma, labels)
    assert out.shape == x.shape and out.dtype == torch.float32 and torch.isfinite(out).all()
    assert not torch.allclose(out, net.sigma_data ** 2 / (sigma.reshape(-1, 1, 1, 1) ** 2 + net.sigma_data ** 2) * x)
    assert torch.equal(copy_(x, sigma, labels), out)

def test_sigma_shapes_and_missing_labels():
    net = randomize(tiny_song()).eval()
    x, sigma, labels = inputs()
    out = net(x, sigma, labels)
    assert torch.equal(net(x, sigma.reshape(-1, 1, 1, 1), labels), out)
    scalar = net(x, torch.tensor(5.0), labels)
    assert torch.allclose(scalar, net(x, torch.full([2], 5.0), labels), atol=1e-6)
    assert torch.allclose(net(x, 5.0, labels), scalar, atol=1e-6)
    assert net(x, sigma).shape == x.shape # no labels: EDM feeds an all-zero label vector

# EDM's attention on its own layout: qkv channels [head, channel, (q,k,v)], w = softmax_k(sum_c q[c,q] k[c,k] / sqrt(c)),
# a[c,q] = sum_k w[q,k] v[c,k], in fp32; then proj and the residual, as the last part of a UNetBlock.
def edm_attention_output(block, x):
    q, k, v = block.qkv(block.norm2(x)).reshape(x.shape[0] * block.num_heads, x.shape[1] // block.num_heads, 3, -1).unbind(2)
    w = torch.einsum('ncq,nck->nqk', q, k / np.sqrt(k.shape[1])).softmax(dim=2)
    a = torch.einsum('nqk,nck->ncq', w, v)
    return (block.proj(a.reshape(*x.shape)) + x) * block.skip_scale

def test_attention_matches_edm_softmax_formula():
    for net in [randomize(tiny_song()).eval(), randomize(tiny_adm()).eval()]:
        blocks = [b for b in net.modules() if isinstance(b, edm_nets.UNetBlock) and b.num_heads]
        seen = {}
        hooks = [b.norm2.register_forward_pre_hook(lambda m, args, b=b: seen.__setitem__(b, [args[0].clone()])) for b in blocks]
        hooks += [b.register_forward_hook(lambda m, args, out, b=b: seen[b].append(out)) for b in blocks]
        x, sigma, labels = inputs()
        with torch.no_grad():
            net(x, sigma, labels)
            for block, (x_in, ours) in seen.items():
                reference = edm_attention_output(block, x_in)
                # fp32, different summation orders: dot products over c channels, sums over N pixels, proj over C
                # channels, each off by at most (terms) * eps relative to the magnitudes summed (values ~1).
                c, C, N = x_in.shape[1] // block.num_heads, x_in.shape[1], x_in[0, 0].numel()
                tol = (c + N + C) * torch.finfo(torch.float32).eps * reference.abs().max()
                torch.testing.assert_close(ours, reference, atol=tol, rtol=0)
        assert len(seen) == len(blocks) > 0
        for h in hooks:
            h.remove()

# The fused SDPA kernels (flash, memory-efficient, cuDNN) take only [batch, head, token, channel] tensors whose
# channels are contiguous; anything else runs the math kernel, which stores every attention map in fp32.
def test_attention_reaches_a_fused_sdpa_kernel(monkeypatch):
    from torch.nn.attention import SDPBackend
    sdpa = torch.nn.functional.scaled_dot_product_attention
    calls = []
    def spy(q, k, v, *args, **kwargs):
        calls.append(([t.dim() for t in (q, k, v)], [t.stride(-1) for t in (q, k, v)], SDPBackend(torch._fused_sdp_choice(q, k, v))))
        return sdpa(q, k, v, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', spy)
    for net in [randomize(tiny_song()).eval(), randomize(tiny_adm()).eval()]:
        x, sigma, labels = inputs()
        for dtype in [torch.float32, torch.bfloat16]:
            with torch.autocast('cpu', dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                net(x, sigma, labels)
    assert len(calls) >= 4
    for dims, strides, backend in calls:
        assert dims == [4, 4, 4] and strides == [1, 1, 1] and backend != SDPBackend.MATH, (dims, strides, backend)

def test_use_fp16_is_ignored_off_cuda():
    net = randomize(tiny_adm()).eval()
    half = EDMPrecond(**{**net.init_kwargs, 'use_fp16': True}).eval()
    half.load_state_dict(net.state_dict())
    x, sigma, labels = inputs()
    assert torch.equal(half(x, sigma, labels), net(x, sigma, labels))

@pytest.mark.parametrize('make', [tiny_song, tiny_adm])
def test_bf16_autocast_forward_and_backward(make):
    net = randomize(make()).eval()
    x, sigma, labels = inputs()
    reference = net(x, sigma, labels)
    x = x.clone().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out, features = net.forward_features(x, sigma, labels, resolutions=(8,))
    assert out.dtype == torch.float32 and torch.isfinite(out).all()
    assert (out - reference).norm() / reference.norm() < 0.05
    (out.square().mean() + features[0].mean()).backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0

#----------------------------------------------------------------------------
# Full released configurations (meta device): parameter counts and exact keys/shapes.

FIXTURE = json.load(open(os.path.join(os.path.dirname(__file__), 'edm_keys.json')))

# As NVlabs/edm train.py builds them: --arch=ddpmpp --cond=1 (augment 0.12 -> augment_dim=9), dropout 0.13;
# --arch=adm --cond=1 --augment=0 --dropout=0.10 --fp16=1.
RELEASED = {
    'cifar10_ddpmpp': (dict(img_resolution=32, img_channels=3, label_dim=10, use_fp16=False, model_type='SongUNet',
        embedding_type='positional', encoder_type='standard', decoder_type='standard', channel_mult_noise=1,
        resample_filter=[1,1], model_channels=128, channel_mult=[2,2,2], augment_dim=9, dropout=0.13), 55_735_299),
    'imagenet64_adm': (dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, model_type='DhariwalUNet',
        model_channels=192, channel_mult=[1,2,3,4], dropout=0.1), 295_899_267),
}

@pytest.mark.parametrize('name', list(RELEASED))
def test_released_configs_parameter_counts_and_keys(name):
    kwargs, num_parameters = RELEASED[name]
    with torch.device('meta'):
        net = EDMPrecond(**kwargs)
    assert sum(p.numel() for p in net.parameters()) == num_parameters
    assert FIXTURE['configs'][name]['num_parameters'] == num_parameters
    assert {k: list(v.shape) for k, v in net.state_dict().items()} == FIXTURE['configs'][name]['state_dict']

def test_released_configs_spot_shapes_from_networks_py():
    # Shapes worked out by hand from NVlabs/edm networks.py, independent of our code.
    with torch.device('meta'):
        cifar = EDMPrecond(**RELEASED['cifar10_ddpmpp'][0])
        adm = EDMPrecond(**RELEASED['imagenet64_adm'][0])
    cifar, adm = cifar.state_dict(), adm.state_dict()
    assert cifar['model.map_layer0.weight'].shape == (512, 128)              # noise 128 -> emb 4*128
    assert cifar['model.enc.16x16_block0.qkv.weight'].shape == (768, 256, 1, 1) # attention at 16x16, 3*256
    assert cifar['model.enc.16x16_down.conv0.resample_filter'].shape == (1, 1, 2, 2)
    assert cifar['model.dec.32x32_aux_conv.weight'].shape == (3, 256, 3, 3)
    assert 'model.dec.16x16_aux_conv.weight' not in cifar                   # standard decoder: output at 32x32 only
    assert adm['model.map_label.weight'].shape == (768, 1000) and 'model.map_label.bias' not in adm
    assert adm['model.enc.8x8_block2.qkv.weight'].shape == (2304, 768, 1, 1)  # 768 channels, 12 heads of 64
    assert adm['model.enc.8x8_block2.affine.weight'].shape == (1536, 768)     # adaptive scale + shift
    assert adm['model.out_conv.weight'].shape == (3, 192, 3, 3)

def test_feature_channels_of_released_configs():
    with torch.device('meta'):
        cifar = EDMPrecond(**RELEASED['cifar10_ddpmpp'][0])
        adm = EDMPrecond(**RELEASED['imagenet64_adm'][0])
    assert cifar.feature_names((32, 16, 8)) == ['32x32_block3', '16x16_block3', '8x8_block3']
    assert edm_nets.feature_channels(cifar, (32, 16, 8)) == [256, 256, 256]
    assert adm.feature_names((8,)) == ['8x8_block2']
    assert edm_nets.feature_channels(adm, (8,)) == [768]
    with pytest.raises(ValueError, match='4x4'):
        adm.feature_names((4,))

#----------------------------------------------------------------------------
# Feature tap.

@pytest.mark.parametrize('make', [lambda: tiny_song(*SONG_OPTIONS[1]), tiny_adm])
def test_feature_tap_matches_forward_hooks_and_forward(make):
    net = randomize(make()).eval()
    resolutions = (4, 16, 8) if net.init_kwargs['model_type'] == 'SongUNet' else (8, 16)
    hooked = {}
    for name in net.feature_names(resolutions):
        net.model.enc[name].register_forward_hook(lambda module, args, out, name=name: hooked.__setitem__(name, out))
    x, sigma, labels = inputs()
    D_x, features = net.forward_features(x, sigma, labels, resolutions=resolutions)
    assert torch.equal(D_x, net(x, sigma, labels))
    channels = edm_nets.feature_channels(net, resolutions)
    for res, c, name, feature in zip(resolutions, channels, net.feature_names(resolutions), features):
        assert feature.shape == (2, c, res, res)
        assert name == f'{res}x{res}_block{net.init_kwargs["num_blocks"] - 1}' # last encoder block at res x res
        assert torch.equal(feature, hooked[name])

def test_gradient_reaches_input_through_both_outputs():
    net = randomize(tiny_song()).eval().requires_grad_(False)
    x, sigma, labels = inputs()
    for pick in [lambda D_x, f: D_x.square().sum(), lambda D_x, f: f[0].square().sum(), lambda D_x, f: f[1].sum()]:
        x_ = x.clone().requires_grad_(True)
        D_x, features = net.forward_features(x_, sigma, labels, resolutions=(16, 8))
        pick(D_x, features).backward()
        assert torch.isfinite(x_.grad).all() and x_.grad.abs().sum() > 0

#----------------------------------------------------------------------------
# One-step generator.

def test_generator_is_teacher_at_sigma_init_without_dropout():
    teacher = randomize(tiny_song()).eval().requires_grad_(False)
    G = edm_nets.make_generator(teacher)
    assert G.sigma_init == 80.0 and G.training
    assert all(p.requires_grad for p in G.parameters())
    assert all(b.dropout == 0 for b in G.net.modules() if isinstance(b, edm_nets.UNetBlock))
    assert G.net.init_kwargs['dropout'] == 0 and teacher.init_kwargs['dropout'] == 0.1
    assert all(b.dropout == 0.1 for b in teacher.modules() if isinstance(b, edm_nets.UNetBlock))
    z, _, labels = inputs()
    out = G(z, labels)
    assert torch.equal(out, G(z, labels)) # training mode, yet deterministic: dropout is off
    assert torch.allclose(out, teacher(80 * z, torch.full([2], 80.0), labels), atol=1e-6)
    with torch.no_grad():
        next(G.parameters()).add_(1)
    assert not torch.equal(next(G.parameters()), next(teacher.parameters()))

#----------------------------------------------------------------------------
# Sampler.

def test_sigma_steps_closed_form():
    for N in [1, 2, 18, 256]:
        smin, smax, rho = 0.002, 80.0, 7.0
        i = np.arange(N)
        closed = (smax ** (1 / rho) + i / max(N - 1, 1) * (smin ** (1 / rho) - smax ** (1 / rho))) ** rho
        t = edm_nets.sigma_steps(N, smin, smax, rho)
        assert t.dtype == torch.float64 and t.shape == (N + 1,) and t[-1] == 0
        np.testing.assert_allclose(t[:-1].numpy(), closed, rtol=1e-12)
    t = edm_nets.sigma_steps(18)
    assert t[0] == 80.0 and abs(t[17] - 0.002) < 1e-12 and (t[:-1].diff() < 0).all()

class Counting:
    def __init__(self, net):
        self.net, self.calls = net, 0
        self.sigma_min, self.sigma_max = net.sigma_min, net.sigma_max
    def __call__(self, *args):
        self.calls += 1
        return self.net(*args)

def test_one_step_sampler_is_the_denoiser_at_sigma_max():
    net = randomize(tiny_song()).eval()
    z, _, labels = inputs()
    counting = Counting(net)
    x = edm_nets.edm_sampler(counting, z, labels, num_steps=1)
    assert counting.calls == 1 and x.shape == z.shape and x.dtype == torch.float64
    assert torch.allclose(x.float(), net(80 * z, torch.full([2], 80.0), labels), atol=1e-5)

def test_heun_sampler_solves_gaussian_probability_flow():
    # Data ~ N(0, s^2 I): D(x; sigma) = s^2 / (s^2 + sigma^2) x and the ODE maps x_T to x_T s / sqrt(s^2 + T^2).
    # Heun is second order: doubling the steps cuts the error about 4x (Euler would give 2x).
    s = 0.5
    class Gaussian:
        sigma_min, sigma_max = 0, float('inf')
        def __call__(self, x, sigma, class_labels=None):
            return s ** 2 / (s ** 2 + sigma ** 2) * x
    z = torch.randn([4, 3, 2, 2])
    exact = 80 * z.double() * s / np.sqrt(s ** 2 + 80 ** 2)
    errors = [((edm_nets.edm_sampler(Gaussian(), z, num_steps=N) - exact).norm() / exact.norm()).item() for N in [18, 36, 72]]
    assert errors[0] < 0.06 and errors[2] < 0.004
    assert 3.5 < errors[0] / errors[1] < 5.5 and 3.5 < errors[1] / errors[2] < 5.5

def test_sampler_18_steps_shapes_nfe_and_per_seed_determinism():
    net = randomize(EDMPrecond(img_resolution=8, img_channels=3, label_dim=4, model_type='SongUNet',
        model_channels=8, channel_mult=[1,2], num_blocks=1, attn_resolutions=[4])).eval()
    seeds = [3, 7, 11]
    def sample(seeds):
        rnd = edm_nets.StackedRandomGenerator('cpu', seeds)
        latents = rnd.randn([len(seeds), 3, 8, 8])
        labels = torch.eye(4)[rnd.randint(4, size=[len(seeds)])]
        counting = Counting(net)
        x = edm_nets.edm_sampler(counting, latents, labels, randn_like=rnd.randn_like, num_steps=18, S_churn=5)
        return x, counting.calls
    batch, calls = sample(seeds)
    assert batch.shape == (3, 3, 8, 8) and torch.isfinite(batch).all() and calls == 35
    alone, _ = sample([7])
    # Batch 1 and batch 3 run other float32 conv blockings: each of the 35 calls may differ by a few ulp of |x| ~ 1,
    # carried to the output by the ODE; another seed's image differs by O(1).
    assert torch.allclose(alone[0], batch[1], atol=1e-5, rtol=0)
    assert not torch.allclose(batch[0], batch[1])

def test_imagenet_preset_is_edm_stochastic_sampler():
    assert edm_nets.SAMPLER_PRESETS['imagenet64'] == dict(num_steps=256, S_churn=40, S_min=0.05, S_max=50, S_noise=1.003)

#----------------------------------------------------------------------------
# Official EDM pickle format, written here without EDM's code: each network is a reduce call to
# torch_utils.persistence._reconstruct_persistent_obj(meta); tensors go through torch's own
# pickling (torch._utils._rebuild_*, torch.storage._load_from_bytes); numpy scalars under the
# numpy 1 name numpy.core.multiarray.scalar; dataset_kwargs as dnnlib.util.EasyDict.

def hostile_src(marker):
    return f'open({str(marker)!r}, "w").write("module_src ran")\nraise RuntimeError("module_src executed")\n'

@pytest.mark.parametrize('make', [lambda: tiny_song(*SONG_OPTIONS[1]), tiny_adm])
def test_load_official_format_pickle(make, tmp_path):
    net = randomize(make())
    ema = copy.deepcopy(net).eval().requires_grad_(False)
    marker = tmp_path / 'marker'
    path = tmp_path / 'network-snapshot.pkl'
    write_edm_pickle(path, dict(ema=ema, loss_fn=EDMLoss(), augment_pipe=None), hostile_src(marker))
    raw = path.read_bytes()
    for name in [b'_reconstruct_persistent_obj', b'_load_from_bytes', b'_rebuild_parameter', b'EasyDict', b'ModuleDict']:
        assert name in raw
    assert (b'numpy.core.multiarray' in raw) == (net.init_kwargs['model_type'] == 'SongUNet') # SongUNet skip_scale = np.sqrt(0.5)
    assert 'torch_utils' not in sys.modules and 'dnnlib' not in sys.modules

    data = edm_pickle.load_edm_pickle(str(path))
    assert not marker.exists()
    loaded = data['ema']
    assert type(loaded) is EDMPrecond and not loaded.training
    assert loaded.init_kwargs == net.init_kwargs
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), net.state_dict().values()))
    x, sigma, labels = inputs()
    assert torch.equal(loaded(x, sigma, labels), ema(x, sigma, labels))
    assert data['loss_fn'].class_name == 'EDMLoss' and data['loss_fn'].state['P_mean'] == -1.2
    assert data['dataset_kwargs'] == dict(path='cifar10-32x32.zip', use_labels=True)

class Evil:
    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg
    def __reduce__(self):
        return self.fn, (self.arg,)

@pytest.mark.parametrize('kind', ['os.system', 'builtins.eval'])
def test_hostile_reducer_is_refused_and_nothing_runs(kind, tmp_path):
    marker = tmp_path / 'marker'
    payload = Evil(os.system, f'touch {marker}') if kind == 'os.system' else Evil(eval, f'open({str(marker)!r}, "w")')
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(dict(ema=payload)))
    refused = f'{os.system.__module__}.system' if kind == 'os.system' else 'builtins.eval'
    with pytest.raises(ValueError, match=refused.replace('.', r'\.')):
        edm_pickle.load_edm_pickle(str(path))
    assert not marker.exists()

def test_hostile_storage_bytes_are_not_run(tmp_path):
    marker = tmp_path / 'marker'
    inner = pickle.dumps(Evil(os.system, f'touch {marker}'))
    path = tmp_path / 'evil.pkl'
    path.write_bytes(pickle.dumps(dict(ema=Evil(torch.storage._load_from_bytes, inner))))
    with pytest.raises(ValueError, match="not plain tensor data"):
        edm_pickle.load_edm_pickle(str(path))
    assert not marker.exists()

def test_pickle_errors_are_one_clear_line(tmp_path):
    with pytest.raises(FileNotFoundError, match='missing.pkl'):
        edm_pickle.load_edm_pickle(str(tmp_path / 'missing.pkl'))
    class VPPrecond(torch.nn.Module):
        pass
    path = tmp_path / 'vp.pkl'
    write_edm_pickle(path, dict(ema=VPPrecond()), 'raise RuntimeError')
    with pytest.raises(ValueError, match='VPPrecond'):
        edm_pickle.load_edm_pickle(str(path))

#----------------------------------------------------------------------------
# A network file of constructor kwargs + state dict, plain tensors only: EDMPrecond's init_kwargs rebuild it.
# (Only this test uses the format; it moved here from edm_nets.py.)

def save_network(path, net):
    tmp = path + '.tmp'
    torch.save(dict(kwargs=net.init_kwargs, state_dict=net.state_dict()), tmp)
    os.replace(tmp, path)

def load_network(path):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Network file not found: {path} (write it with save_network)')
    data = torch.load(path, map_location='cpu', weights_only=True)
    net = EDMPrecond(**data['kwargs'])
    net.load_state_dict(data['state_dict'], strict=True)
    return net

def test_save_and_load_network(tmp_path):
    net = randomize(tiny_adm()).eval()
    path = str(tmp_path / 'net.pt')
    save_network(path, net)
    assert os.listdir(tmp_path) == ['net.pt']
    loaded = load_network(path).eval()
    x, sigma, labels = inputs()
    assert loaded.init_kwargs == net.init_kwargs and torch.equal(loaded(x, sigma, labels), net(x, sigma, labels))
    with pytest.raises(FileNotFoundError, match='nope.pt'):
        load_network(str(tmp_path / 'nope.pt'))

# DDP runs without find_unused_parameters (training_loop.setup): every trainable parameter of a student or fake score
# must get a gradient from one pass. The teachers' map_augment (EDM's augmentation conditioning) is never given
# labels, so the trainable copies freeze it; no other layer of any SongUNet or DhariwalUNet variant is left out.
@pytest.mark.parametrize('net', ['song standard/standard', 'song skip/skip', 'song residual/skip', 'adm'])
def test_trainable_copies_give_every_trainable_parameter_a_gradient(net):
    if net == 'adm':
        teacher = tiny_adm(augment_dim=9)
    else:
        encoder, decoder = net.split()[1].split('/')
        teacher = tiny_song(encoder_type=encoder, decoder_type=decoder, augment_dim=9)
    generator, fake_score = edm_nets.make_generator(teacher), edm_nets.copy_without_dropout(teacher)
    x, labels = torch.randn(2, 3, 16, 16), torch.eye(4)[:2]
    generator(x, labels).square().sum().backward()
    fake_score(x, torch.tensor([1.0, 5.0]), labels).square().sum().backward()
    for student in (generator, fake_score):
        assert [n for n, p in student.named_parameters() if p.requires_grad and p.grad is None] == []
        assert [n for n, p in student.named_parameters() if not p.requires_grad] == [n for n in dict(student.named_parameters()) if 'map_augment' in n] != []
