"""f-distill of Stable Diffusion v1.5 into a one-step text-to-image generator (Table 5, COYO-700M column).

    torchrun --nproc_per_node=8 train_t2i.py --f js --sd stable-diffusion-v1-5/ \\
        --data captions.jsonl --outdir runs/sd15-js

Algorithm 1 in SD's latent space. The UNets speak EDM's denoiser convention through sd_unet.sd_denoiser,
so the loop, losses and checkpoints are those of train_cifar.py / train_imagenet.py (training_loop.py).
The paper warms the discriminator up from a reverse-KL run before switching to JS (Sec. 5.1):
run `--f rkl --iterations 10000` first, then `--f js --init-from <that run>/checkpoint-0010000.pt` (a run's
last checkpoint is always kept; snapshot-*.pt files hold the generator only, no discriminator).
"""

import argparse
import copy
import csv
import json
import os

import numpy as np
import PIL.Image
import torch

import dataset
import distributed
import fdistill
import flags
import plan
import sd_unet
import training_loop

PRESET = dict(
    outdir      = 'runs/sd15',
    f           = 'js',             # Best MS-COCO FID in Table 4 (JS, 7.42 at CFG 1.75).
    batch       = 1024,             # Table 5.
    tau         = 10,
    w_gan       = 1e-3,
    disc_res    = '8',              # The teacher's mid-block output, 1280 x 8 x 8 for 64 x 64 latents.
    iterations  = 60000,
    lr          = 1e-5,
    r1_gamma    = 1.0,
    r1_approx   = 0.1,              # Exact R1 through 4096-token attention needs the math kernel's double backward; 0.1 stands above bf16 rounding.
    ema_halflife_kimg = 120,        # ~2% of the 6.1 Mimg the generator sees (EDM's ImageNet ratio: --ema 50 Mimg of 2.5 Gimg).
    snap_every  = 5000,             # 13 snapshots of 6.9 GB.
    precision   = 'bf16',           # SD v1.5 is released and run in half precision; bf16 needs no loss scaling.
)

def add_t2i_args(p):
    p.add_argument('--sd',              default=None,               help='Local diffusers-format SD v1.5 folder (unet/, vae/, text_encoder/, tokenizer/)')
    p.add_argument('--data',            default=None,               help='Image-caption pairs: a .jsonl ({"image", "caption"}), a .csv (image,caption) or a folder of images with .txt captions')
    p.add_argument('--cfg',             default=1.75, type=float,   help='Classifier-free guidance of the teacher denoiser (Table 5)')
    p.add_argument('--resolution',      default=512, type=flags.positive_int, help='Image resolution; latents are resolution / 8')
    p.add_argument('--grad-ckpt',       default=True, action=argparse.BooleanOptionalAction, help='Gradient checkpointing in all three UNets; the preset\'s 128 per GPU needs it on 80 GB GPUs')
    p.add_argument('--random-teacher',  action='store_true',        help='Benchmark only: SD v1.5\'s architecture with random weights, no data')
    p.add_argument('--encode-batch',    default=16, type=flags.positive_int, help='Images per VAE call when caching latents')

#----------------------------------------------------------------------------
# Image-caption pairs from local disk, validated before any compute.

def read_pairs(path):
    if path is None or not os.path.exists(path):
        raise FileNotFoundError(f'--data not found: {path} (a .jsonl of {{"image", "caption"}}, a .csv with image,caption columns, or a folder of images with .txt captions)')
    root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        images = sorted(f for f in os.listdir(path) if f.lower().endswith(('.png', '.jpg', '.jpeg', '.webp')))
        pairs = []
        for f in images:
            txt = os.path.join(path, os.path.splitext(f)[0] + '.txt')
            if not os.path.isfile(txt):
                raise FileNotFoundError(f'Caption file missing: {txt} (each image in {path} needs a .txt caption beside it)')
            pairs.append((f, open(txt, encoding='utf-8').read().strip()))
    elif path.endswith('.jsonl'):
        rows = [json.loads(line) for line in open(path, encoding='utf-8') if line.strip()]
        pairs = [(row.get('image', row.get('file_name')), row.get('caption', row.get('text'))) for row in rows]
    elif path.endswith('.csv'):
        with open(path, newline='', encoding='utf-8') as f:
            pairs = [(row['image'], row['caption']) for row in csv.DictReader(f)]
    else:
        raise ValueError(f'--data {path}: expected a .jsonl, a .csv or a folder')
    if not pairs:
        raise ValueError(f'--data {path} holds no image-caption pairs')
    pairs = [(os.path.join(root, image) if image else image, caption) for image, caption in pairs]
    for image, caption in pairs:
        if not image or caption is None or not os.path.isfile(image):
            raise FileNotFoundError(f'--data {path}: image {image!r} with caption {caption!r} not found')
    return pairs

def load_image(path, resolution):
    with open(path, 'rb') as f:
        image = dataset.open_image(f, f'--data image {path}').convert('RGB')
    scale = resolution / min(image.size)                          # Resize the short side, centre crop.
    image = image.resize((max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale))), PIL.Image.BICUBIC)
    left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
    image = np.array(image.crop((left, top, left + resolution, top + resolution)))
    return torch.from_numpy(image).permute(2, 0, 1).float() / 127.5 - 1

# The real latents, VAE-encoded once into <outdir>/latents-<resolution>.npy (memory-mapped; each process
# encodes its share) and reused by later runs and resumes.
def cached_latents(opts, pairs, vae, latent_shape, device, rank, world):
    path = os.path.join(opts.outdir, f'latents-{opts.resolution}.npy')
    shape = (len(pairs),) + tuple(latent_shape)
    if not os.path.isfile(path):
        if rank == 0:
            os.makedirs(opts.outdir, exist_ok=True)
            np.lib.format.open_memmap(path + '.tmp', mode='w+', dtype=np.float16, shape=shape).flush()
        distributed.barrier()
        cache = np.lib.format.open_memmap(path + '.tmp', mode='r+')
        mine = np.arange(rank, len(pairs), world)
        for chunk in np.array_split(mine, max(1, len(mine) // opts.encode_batch)):
            images = torch.stack([load_image(pairs[i][0], opts.resolution) for i in chunk])
            cache[chunk] = sd_unet.vae_encode(vae, images.to(device)).float().cpu().numpy()
        cache.flush()
        del cache
        distributed.barrier()
        if rank == 0:
            os.replace(path + '.tmp', path)
        distributed.barrier()
    cache = np.load(path, mmap_mode='r')
    if cache.shape != shape:
        raise ValueError(f'{path} holds latents of shape {cache.shape}, expected {shape}; delete it to re-encode --data')
    return cache

#----------------------------------------------------------------------------
# The UNets as EDM denoisers; `net` is what checkpoints store (training_loop.unwrap_net).

class Denoiser(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.net = unet

    def forward(self, x, sigma, ctx):
        return sd_unet.sd_denoiser(self.net, ctx)(x, sigma)

class Generator(torch.nn.Module):
    def __init__(self, unet):
        super().__init__()
        self.net = sd_unet.SDGenerator(unet)

    def forward(self, z, ctx):
        return self.net(z, ctx)

def build_task(opts, device, rank, world):
    if opts.plan or opts.random_teacher:        # SD v1.5's architecture, random weights, no data
        if not (opts.plan or opts.benchmark):
            raise ValueError('--random-teacher is for --benchmark only')
        sd = random_sd(device)
        return sd_task(opts, sd, [('', '')] * 2, np.zeros((2, sd['vae'].config.latent_channels) + (latent_resolution(opts, sd),) * 2), device)
    if opts.sd is None:
        raise ValueError('--sd is required: a local diffusers-format SD v1.5 folder')
    pairs = read_pairs(opts.data)
    sd = sd_unet.load_sd(opts.sd, device)
    latent_res = latent_resolution(opts, sd)
    latents = cached_latents(opts, pairs, sd['vae'], (sd['vae'].config.latent_channels, latent_res, latent_res), device, rank, world)
    return sd_task(opts, sd, pairs, latents, device)

def latent_resolution(opts, sd):
    return opts.resolution // 2 ** (len(sd['vae'].config.block_out_channels) - 1)               # 512 -> 64 for SD v1.5

def sd_task(opts, sd, pairs, latents, device):
    channels = sd['unet_config'].get('block_out_channels', (320, 640, 1280, 1280))
    mid_res = latents.shape[-1] // 2 ** (len(channels) - 1)                         # 64 -> 8
    if opts.disc_res != [mid_res]:
        raise ValueError(f'--disc-res {opts.disc_res[0]}: the discriminator reads the mid block, {mid_res}x{mid_res} at --resolution {opts.resolution}')
    teacher_unet = sd['unet'].eval().requires_grad_(False)
    teacher_unet.gradient_checkpointing = opts.grad_ckpt
    uncond = sd_unet.encode_prompts(sd['tokenizer'], sd['text_encoder'], [''])
    generator = Generator(trainable_copy(teacher_unet, opts.grad_ckpt))
    fake_score = Denoiser(trainable_copy(teacher_unet, opts.grad_ckpt))
    head_kwargs = dict(channels=[channels[-1]], resolutions=opts.disc_res)

    def teacher(x, sigma, ctx, decoder='grad'): # CFG teacher (App. D.5); features of the conditional pass
        D_x, features = sd_unet.sd_denoiser(teacher_unet, ctx, uncond, opts.cfg)(x, sigma, return_features=True, decoder=decoder)
        return D_x, [features['mid']]

    def cond(indices):
        return text_context(sd, [pairs[i][1] for i in indices], device, opts.precision)

    def to_images(y):       # in chunks of sd_unet.VAE_DECODE_BATCH images: the decoder's activations are the grid's peak
        return ((sd_unet.vae_decode(sd['vae'], y.float()) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    return training_loop.Task(
        generator=generator, fake_score=fake_score, head=fdistill.DiscriminatorHead(**head_kwargs),
        teacher=teacher, cond=cond, num_real=len(pairs), z_shape=tuple(latents.shape[1:]),
        real=lambda indices: torch.from_numpy(np.stack([latents[i] for i in indices])).float(),          # on the CPU: DataLoader workers
        to_images=to_images, sigma_levels=sd_unet.SIGMAS.float(), dsm_weight=fdistill.eps_weight,     # the fake score's DSM in SD's eps-MSE (DMD2)
        meta=dict(sd=os.path.abspath(opts.sd or ''), unet_config=sd['unet_config'], head_kwargs=head_kwargs, cfg=opts.cfg),
        captions=lambda indices: [pairs[i][1] for i in indices])

# SD v1.5's UNet, VAE and CLIP text encoder as released (stable-diffusion-v1-5's config.json files), with random
# weights; --plan builds them on fake tensors. Prompts all read as empty: only their shape matters there.
def random_sd(device):
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel
    with torch.device(device):
        vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=('DownEncoderBlock2D',) * 4, up_block_types=('UpDecoderBlock2D',) * 4,
            block_out_channels=(128, 256, 512, 512), layers_per_block=2, latent_channels=4, norm_num_groups=32, sample_size=512, scaling_factor=0.18215)
        text_encoder = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
            num_attention_heads=12, max_position_embeddings=77, hidden_act='quick_gelu', projection_dim=768))
        unet = sd_unet.SDUNet()
    return dict(unet=unet, vae=vae.eval().requires_grad_(False), text_encoder=text_encoder.eval().requires_grad_(False),
        tokenizer=EmptyPrompts(), unet_config={})

class EmptyPrompts:                             # CLIPTokenizer's call as encode_prompts makes it, every prompt empty
    model_max_length = 77

    def __call__(self, prompts, max_length, return_tensors, **kwargs):
        return argparse.Namespace(input_ids=torch.zeros(len(prompts), max_length, dtype=torch.long))

# The prompts' CLIP context, every round: under bf16 autocast with --precision bf16 as the UNets run (fp32 otherwise).
def text_context(sd, prompts, device, precision):
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == 'bf16'):
        return sd_unet.encode_prompts(sd['tokenizer'], sd['text_encoder'], prompts).to(device)

def trainable_copy(unet, grad_ckpt):
    unet = copy.deepcopy(unet).train().requires_grad_(True)
    unet.gradient_checkpointing = grad_ckpt
    return unet

#----------------------------------------------------------------------------

if __name__ == '__main__':
    with flags.user_errors('train_t2i.py'):
        opts = flags.parse_args(__doc__, PRESET, add_t2i_args)
        (plan.main if opts.plan else training_loop.main)(opts, build_task)   # --plan: memory and FLOPs on fake tensors

#----------------------------------------------------------------------------
