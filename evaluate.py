"""Evaluate one-step generators and their teachers the way the field does (Tables 2-4, Fig. 5).

  python evaluate.py ref      --data cifar10-32x32.zip --dest refs/cifar10.npz --detector inception-2015-12-05.pt
  python evaluate.py generate --ckpt runs/00000-cifar --outdir samples.zip --seeds 0-49999
  torchrun --nproc_per_node=8 evaluate.py fid --ckpt runs/00000-cifar --ref refs/cifar10.npz \\
      --detector inception-2015-12-05.pt --repeats 3
  python evaluate.py fid      --teacher edm-cifar10-32x32-cond-vp.pkl --steps 18 --ref ... --detector ...
  python evaluate.py clip     --images samples/ --captions captions.txt --clip-model clip-vit-large/
  python evaluate.py latency  --ckpt runs/00000-cifar
  python evaluate.py weights  --ckpt runs/00000-cifar --num-images 6400
  python evaluate.py export   --ckpt runs/00000-cifar --dest exported/    # also SD runs: a diffusers UNet folder
  python evaluate.py plot     --ckpt runs/00000-cifar                  # PNGs of stats.jsonl into runs/00000-cifar/plots/

Text-to-image (Table 4): a train_t2i.py run, or SD v1.5 itself (--sd alone: DDIM, 50 steps, CFG 3), prompted
from a caption list (seed s gets line s mod N); `generate` writes captions.txt beside the images.
  python evaluate.py generate --ckpt runs/sd15-js --captions coco30k.txt --outdir coco.zip --seeds 0-29999
  torchrun --nproc_per_node=8 evaluate.py fid --ckpt runs/sd15-js --captions coco30k.txt --ref refs/coco-val.npz \
      --detector inception-2015-12-05.pt --no-pr
  python evaluate.py clip     --ckpt runs/sd15-js --captions coco30k.txt --clip-model clip-vit-g-14/
  python evaluate.py clip     --images coco.zip --clip-model clip-vit-g-14/
  python evaluate.py latency  --ckpt runs/sd15-js --bf16
  python evaluate.py fid      --sd stable-diffusion-v1-5/ --captions coco30k.txt --ref ... --detector ...

(Script flags avoid prefixes of torchrun's own flags, e.g. --run or --num, which torchrun would claim.)
FID exactly as EDM's fid.py: NVIDIA's Inception-v3 TorchScript, features summed in float64, unbiased
covariance, scipy's sqrtm. Precision/recall of Kynkaenniemi et al. 2019 (k = 3) as ADM's evaluator computes
them. Every path comes from the user; nothing is downloaded.
"""

import glob
import io
import json
import os
import re
import time
import zipfile
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import PIL.Image
import scipy.linalg
import torch
import torch.distributed as dist

import dataset
import distributed
import fdistill
import flags
import rundir
import sd_unet
from distributed import gather_rows, get_rank, get_world_size, print0

#----------------------------------------------------------------------------
# Processes: torchrun's environment is read by distributed.init_distributed (NCCL on GPUs, gloo on CPU);
# plain python is a world of one.

def init_distributed():
    return distributed.init_distributed()[2]

#----------------------------------------------------------------------------
# Frechet Inception Distance (Heusel et al. 2017), computed as EDM's fid.py does:
# FID = ||mu - mu_ref||^2 + tr(Sigma + Sigma_ref - 2 sqrtm(Sigma Sigma_ref)), real part.

def frechet_distance(mu1, sigma1, mu2, sigma2):
    mu1, sigma1, mu2, sigma2 = (np.asarray(a, dtype=np.float64) for a in (mu1, sigma1, mu2, sigma2))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f'Statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs {sigma2.shape}')
    m = np.square(mu1 - mu2).sum()
    s = scipy.linalg.sqrtm(np.dot(sigma1, sigma2))
    return float(np.real(m + np.trace(sigma1 + sigma2 - s * 2)))

# Running feature statistics as in EDM's fid.py: float64 sum and sum of outer products, all-reduced over
# ranks, then mu = sum / n and the unbiased Sigma = (sum x x^T - n mu mu^T) / (n - 1). The features
# themselves are kept only when precision/recall needs them.
class FeatureStats:
    def __init__(self,
        dim,                        # Feature dimension: the detector's (2048 for Inception-v3 pool3).
        keep_features   = False,    # Keep the features for precision/recall.
        device          = 'cpu',    # Where the sums live.
    ):
        self.num = 0
        self.sum = torch.zeros([dim], dtype=torch.float64, device=device)
        self.sum_outer = torch.zeros([dim, dim], dtype=torch.float64, device=device)
        self.features = [] if keep_features else None

    def append(self, features):
        x = features.to(self.sum.device, torch.float64)
        self.num += len(x)
        self.sum += x.sum(0)
        self.sum_outer += x.T @ x
        if self.features is not None:
            self.features.append(features.to(self.sum.device, torch.float32))

    def total(self):
        return int(fdistill.all_reduce(torch.tensor(self.num, dtype=torch.int64, device=self.sum.device)))

    def mu_sigma(self):
        n = self.total()
        if n < 2:
            raise ValueError(f'Need at least 2 feature vectors for the covariance, got {n}')
        mu = fdistill.all_reduce(self.sum.clone()) / n
        sigma = fdistill.all_reduce(self.sum_outer.clone())
        sigma -= torch.outer(mu, mu) * n
        sigma /= n - 1
        return mu.cpu().numpy(), sigma.cpu().numpy()

    def all_features(self):
        local = torch.cat(self.features) if self.features else self.sum.new_zeros([0, len(self.sum)], dtype=torch.float32)
        return gather_rows(local)

#----------------------------------------------------------------------------
# Reference statistics in EDM's .npz format: 'mu' [2048] and 'sigma' [2048, 2048] (float64), readable by
# EDM's fid.py. Ours may also hold 'features' [N, 2048] (float32), which precision/recall needs.

def save_ref(path, mu, sigma, features=None):
    arrays = dict(mu=np.asarray(mu, dtype=np.float64), sigma=np.asarray(sigma, dtype=np.float64))
    if features is not None:
        arrays['features'] = np.asarray(features, dtype=np.float32)
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.atomic_write(path, lambda f: np.savez(f, **arrays))

def load_ref(path, need_features=False):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Reference statistics "{path}" not found: build them with `python evaluate.py ref --data DATASET --dest {path} --detector ...` or pass EDM\'s published .npz')
    with np.load(path, allow_pickle=False) as data:
        if 'mu' not in data or 'sigma' not in data:
            raise ValueError(f'"{path}" is not an EDM reference .npz: it needs arrays "mu" and "sigma", found {sorted(data.keys())}')
        if need_features and 'features' not in data:
            raise ValueError(f'"{path}" has no "features" array, which precision/recall needs: rebuild it with `python evaluate.py ref` or pass --no-pr')
        return {k: data[k] for k in data.keys()}

#----------------------------------------------------------------------------
# Improved precision and recall (Kynkaenniemi et al. 2019), conventions of ADM's evaluator: each point's
# k-NN ball has the squared distance to its k-th nearest neighbour (itself excluded) as squared radius; precision
# is the fraction of generated points inside some real ball, recall the fraction of real points inside
# some generated ball. Distances are computed in row chunks so 50k x 50k fits in memory.

def squared_distances(a, b):
    return (a.square().sum(1, keepdim=True) - 2 * a @ b.T + b.square().sum(1)[None]).clamp(min=0)

CHUNK_ELEMENTS = 1 << 26                                    # distances held at once (256 MB in float32)

def chunk_rows(num_cols):
    return max(1, CHUNK_ELEMENTS // max(num_cols, 1))

def knn_radii(features, k):
    radii = []
    rows = chunk_rows(len(features))
    for begin in range(0, len(features), rows):
        d = squared_distances(features[begin : begin + rows], features)
        i = torch.arange(len(d), device=d.device)
        d[i, begin + i] = float('inf')                      # not its own neighbour
        radii.append(d.kthvalue(k, dim=1).values)
    return torch.cat(radii)

def manifold_fraction(points, centers, radii):
    inside = []
    rows = chunk_rows(len(centers))
    for begin in range(0, len(points), rows):
        d = squared_distances(points[begin : begin + rows], centers)
        inside.append((d <= radii[None]).any(dim=1))
    return float(torch.cat(inside).double().mean())

def precision_recall(real_features, fake_features, k=3):
    real = torch.as_tensor(real_features, dtype=torch.float32)
    fake = torch.as_tensor(fake_features, dtype=torch.float32, device=real.device)
    if len(real) <= k or len(fake) <= k:
        raise ValueError(f'Precision/recall with k={k} needs more than {k} real and generated samples, got {len(real)} and {len(fake)}')
    precision = manifold_fraction(fake, real, knn_radii(real, k))
    recall = manifold_fraction(real, fake, knn_radii(fake, k))
    return precision, recall

#----------------------------------------------------------------------------
# NVIDIA's Inception-v3 for FID (a PyTorch translation of TensorFlow's inception-2015-12-05), as a
# TorchScript archive: torch.jit.load unpickles no Python objects, but the archive is a program that runs, so
# a detector must come from a source one trusts. Called on uint8 NCHW images of any size. Another TorchScript
# detector with the same call (e.g. a domain classifier) may give features of another size.

DETECTOR_HINT = "download it yourself from NVIDIA's EDM/StyleGAN3 metrics page and pass --detector"

def check_detector(path):
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f'Inception detector "{path}" not found: it is NVIDIA\'s TorchScript inception-2015-12-05.pt; {DETECTOR_HINT} PATH')
    if not zipfile.is_zipfile(path):
        raise ValueError(f'"{path}" is not a TorchScript archive: use NVIDIA\'s inception-2015-12-05.pt (not the .pkl); {DETECTOR_HINT} PATH')

def load_detector(path, device):
    check_detector(path)
    return torch.jit.load(path, map_location=device).eval()

@torch.no_grad()
def inception_features(detector, images):
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])
    return detector(images, return_features=True)

# The detector's feature size, from one blank image of the evaluated shape.
def feature_dim(detector, image_shape, device):
    return inception_features(detector, torch.zeros([1, *image_shape], dtype=torch.uint8, device=device)).shape[-1]

def image_shape(path):
    data = dataset.ImageDataset(path)
    return (data.channels, data.resolution, data.resolution)

#----------------------------------------------------------------------------
# Images on disk: a folder or zip of PNGs in EDM's dataset_tool layout, read by dataset.py in sorted file
# order, as uint8 NCHW batches.

def iterate_images(path, batch_size=64, indices=None):
    data = dataset.ImageDataset(path)
    indices = list(range(len(data))) if indices is None else list(indices)
    for begin in range(0, len(indices), batch_size):
        yield data.images(indices[begin : begin + batch_size])

# PNG writer for a folder or a .zip (chosen by the name); file names are the seeds, 000042.png.
class ImageWriter:
    def __init__(self, path):
        self.path = path
        self.zip = None
        if path.lower().endswith('.zip'):
            if os.path.dirname(path):
                os.makedirs(os.path.dirname(path), exist_ok=True)
            self.zip = zipfile.ZipFile(path + '.tmp', 'w', compression=zipfile.ZIP_STORED)
        else:
            os.makedirs(path, exist_ok=True)

    def write(self, seed, image):
        buf = io.BytesIO()
        to_pil(image).save(buf, format='png')
        self.write_file(f'{seed:06d}.png', buf.getvalue())

    def write_file(self, name, data):
        if self.zip is not None:
            self.zip.writestr(name, data)
        else:
            with open(os.path.join(self.path, name), 'wb') as f:
                f.write(data)

    def close(self):
        if self.zip is not None:
            self.zip.close()
            os.replace(self.path + '.tmp', self.path)

# EDM's generate.py conversion from [-1, 1] to uint8.
def to_uint8(images):
    return (images * 127.5 + 128).clip(0, 255).to(torch.uint8)

def to_pil(image):
    array = image.permute(1, 2, 0).cpu().numpy()
    return PIL.Image.fromarray(array[:, :, 0] if array.shape[2] == 1 else array)

#----------------------------------------------------------------------------
# Seeds. '0-49999' is a range, commas join ranges; for `fid`, each comma-separated range is one seed set.

def parse_range(text):
    m = re.fullmatch(r'\s*(\d+)\s*(?:-\s*(\d+)\s*)?', text)
    if not m:
        raise ValueError(f'Bad seed range "{text}": use e.g. 0-49999')
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if hi < lo:
        raise ValueError(f'Bad seed range "{text}": end before start')
    return list(range(lo, hi + 1))

def parse_seeds(text):
    return [s for part in text.split(',') for s in parse_range(part)]

def parse_seed_sets(text):
    return [parse_range(part) for part in text.split(',')]

#----------------------------------------------------------------------------
# Samplers. Whatever is evaluated -- an EDM run's one-step generator, the EDM teacher with its Heun sampler, a
# text-to-image run's one-step generator, SD v1.5 with DDIM -- is a Sampler: per-seed latents z ~ N(0, I) and
# each seed's condition (a one-hot class label, or a prompt) in, images in [-1, 1] out. generate, FID, CLIP
# score and latency take any of them.

@dataclass
class Sampler:
    sample:         Callable        # sample(z, cond, rnd) -> images in [-1, 1]; rnd: the seeds' StackedRandomGenerator.
    z_shape:        tuple           # Shape of one latent z.
    image_shape:    tuple           # Shape of one image, CHW.
    condition:      Callable        # condition(seeds, device) -> their one-hot labels (None if unconditional) or prompts.
    info:           dict = field(default_factory=dict)  # What reports record about it (sampler, steps, cfg, ...).

def check_file(path, what, hint):
    if not path or not os.path.isfile(path):
        raise FileNotFoundError(f'{what} "{path}" not found: {hint}')

# A file (a checkpoint or a generator snapshot), or a run directory: its latest checkpoint, else its latest snapshot.
def find_checkpoint(path):
    if os.path.isfile(path):
        return path
    found = (sorted(glob.glob(os.path.join(path, 'checkpoint-*.pt'))) or snapshots_of(path)) if os.path.isdir(path) else []
    if not found:
        raise FileNotFoundError(f'No run checkpoint at "{path}": pass a run directory holding checkpoint-<iteration>.pt or snapshot-<iteration>.pt files, or one such file')
    return found[-1]

def snapshots_of(run_dir):
    return sorted(glob.glob(os.path.join(run_dir, 'snapshot-*.pt')))

# EDM runs (train_cifar.py, train_imagenet.py) and text-to-image runs (train_t2i.py) share training_loop.py's
# checkpoint and snapshot (a checkpoint's generator part); a 'unet_config' entry marks the latter. Memory-mapped:
# only the tensors used are read (an SD checkpoint also holds the fake score and both optimisers' states).
EDM_KEYS = ('generator_kwargs', 'sigma_init', 'generator')
T2I_KEYS = ('unet_config', 'generator', 'sd', 'options')

def is_t2i(ckpt):
    return ckpt is not None and 'unet_config' in ckpt

def sd_folder(args, ckpt):
    return args.sd or (ckpt or {}).get('sd')

def load_checkpoint(path):
    path = find_checkpoint(path)
    ckpt = rundir.load_checkpoint(path, mmap=True)
    missing = [k for k in (T2I_KEYS if is_t2i(ckpt) else EDM_KEYS) if ckpt.get(k) is None]
    if missing:
        kind = 'a text-to-image generator (train_t2i.py)' if is_t2i(ckpt) else 'an EDM generator'
        raise ValueError(f'"{path}" is not an f-distill run checkpoint of {kind}: it has no {", ".join(missing)}')
    ckpt['path'] = path
    return ckpt

# Class-balanced labels: seed s gets class s % label_dim, one-hot (EDM convention); None if unconditional.
def class_labels(seeds, label_dim, device):
    if label_dim == 0:
        return None
    return torch.eye(label_dim, device=device)[torch.as_tensor(seeds, device=device) % label_dim]

#----------------------------------------------------------------------------
# EDM. A run's checkpoint rebuilds the student as edm_nets.EDMPrecond(**generator_kwargs) (the EMA weights if
# the run kept them) wrapped in the one-step generator G(z) = D(sigma_init z; sigma_init); the teacher comes
# from an official EDM pickle and samples with EDM's Heun sampler (Karras et al. Alg. 2).

def load_generator(ckpt, device):
    import edm_nets
    net = edm_nets.EDMPrecond(**ckpt['generator_kwargs'])
    net.load_state_dict(ckpt['generator_ema'] if ckpt.get('generator_ema') is not None else ckpt['generator'])
    return edm_nets.OneStepGenerator(net, ckpt['sigma_init']).eval().requires_grad_(False).to(device)

TEACHER_HINT = 'pass the EDM .pkl the run was distilled from (e.g. edm-cifar10-32x32-cond-vp.pkl) with --teacher'

def load_teacher(path, device):
    import edm_nets
    check_file(path, 'Teacher pickle', TEACHER_HINT)
    return edm_nets.load_edm_pickle(path)['ema'].eval().requires_grad_(False).to(device)

def edm_sampler(net, sample, info):
    shape = (net.img_channels, net.img_resolution, net.img_resolution)
    return Sampler(sample, shape, shape, lambda seeds, device: class_labels(seeds, net.label_dim, device), info)

def one_step_sampler(generator):
    return edm_sampler(generator.net, lambda z, labels, rnd: generator(z, labels), dict(sampler='one-step'))

# EDM's presets: 'cifar10' is the deterministic 18-step Heun (35 NFE), 'imagenet64' the stochastic
# 256-step sampler of EDM Table 5; `num_steps` overrides the preset's step count.
def teacher_sampler(teacher, preset='cifar10', num_steps=None):
    import edm_nets
    kwargs = dict(edm_nets.SAMPLER_PRESETS[preset])
    if num_steps is not None:
        kwargs['num_steps'] = num_steps
    sample = lambda z, labels, rnd: edm_nets.edm_sampler(teacher, z, labels, randn_like=rnd.randn_like, **kwargs)
    return edm_sampler(teacher, sample, dict(sampler=preset, steps=kwargs['num_steps']))

def edm_steps(preset):
    import edm_nets
    return edm_nets.SAMPLER_PRESETS[preset]['num_steps']

#----------------------------------------------------------------------------
# Text-to-image (Table 4). A train_t2i.py checkpoint holds the one-step generator's SDUNet (constructor kwargs
# in 'unet_config'; weights in 'generator' / 'generator_ema' as sd_unet.SDGenerator's 'unet.*') and the SD v1.5
# folder it was distilled from ('sd', or --sd), whose VAE decodes its latents and whose CLIP text encoder turns
# prompts into its context. The baseline is that folder's UNet with DDIM (Table 4's teacher: 50 steps, CFG 3).
# Seed s is prompted with caption line s mod N, so seed sets 0-29999, 30000-59999, ... each cover a 30k list.

SD_TEACHER_STEPS = 50                                       # Table 4: SDv1.5 (NFE=50, CFG=3, ODE)
LATENCY_PROMPT = 'a photograph of an astronaut riding a horse'  # latency without --captions: any prompt costs the same (77 tokens)

def check_sd_folder(folder, from_ckpt):
    where = ' (the folder recorded in the checkpoint; pass --sd FOLDER to use a local copy)' if from_ckpt else ''
    if not folder:
        raise FileNotFoundError(f'No SD v1.5 folder: pass --sd FOLDER; {sd_unet.SD_FOLDER_HINT}')
    for name in sd_unet.SD_FOLDER_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise FileNotFoundError(f'{os.path.join(folder, name)} not found{where}; {sd_unet.SD_FOLDER_HINT}')

def load_sd_generator(ckpt, device):
    generator = sd_unet.SDGenerator(sd_unet.SDUNet(**ckpt['unet_config']))
    generator.load_state_dict(ckpt['generator_ema'] if ckpt.get('generator_ema') is not None else ckpt['generator'])
    return generator.eval().requires_grad_(False).to(device)

# Images of `resolution` pixels come from latents of resolution / 2^(VAE levels - 1) (512 -> 64 for SD v1.5).
# sample() goes from prompts to decoded images -- text encoder, UNet(s), VAE decoder -- so its time is Table 4's
# end-to-end latency.
def t2i_sampler(sd, denoise, prompts, resolution, bf16, info):
    factor = 2 ** (len(sd['vae'].config.block_out_channels) - 1)
    if resolution % factor:
        raise ValueError(f'--resolution {resolution} is not a multiple of the VAE\'s downsampling factor {factor}')
    z_shape = (sd['vae'].config.latent_channels, resolution // factor, resolution // factor)

    def sample(z, batch_prompts, rnd):
        with torch.autocast(z.device.type, torch.bfloat16, enabled=bf16):
            ctx = sd_unet.encode_prompts(sd['tokenizer'], sd['text_encoder'], batch_prompts)
            return sd_unet.vae_decode(sd['vae'], denoise(z, ctx))
    condition = lambda seeds, device: [prompts[s % len(prompts)] for s in seeds]
    return Sampler(sample, z_shape, (sd['vae'].config.out_channels, resolution, resolution), condition, dict(info, resolution=resolution))

# The one-step generator G(z, ctx): the UNet at t = 999, eps converted to x0 (CFG is distilled into it).
def sd_one_step_sampler(ckpt, sd, prompts, resolution, bf16, device):
    generator = load_sd_generator(ckpt, device)
    return t2i_sampler(sd, generator, prompts, resolution or ckpt['options']['resolution'], bf16, dict(sampler='one-step'))

def sd_teacher_sampler(sd, prompts, resolution, bf16, num_steps, cfg):
    def denoise(z, ctx):
        uncond = sd_unet.encode_prompts(sd['tokenizer'], sd['text_encoder'], ['']) if cfg != 1 else None
        return sd_unet.ddim_sample(sd['unet'], z, ctx, uncond, num_steps, cfg)
    factor = 2 ** (len(sd['vae'].config.block_out_channels) - 1)
    return t2i_sampler(sd, denoise, prompts, resolution or sd['unet'].sample_size * factor, bf16, dict(sampler='ddim', steps=num_steps, cfg=cfg))

#----------------------------------------------------------------------------
# Generation, one seed per image.

# Seeds split across ranks in EDM's way, so every rank runs the same number of (possibly empty) batches.
def rank_batches(seeds, batch_size):
    world_size = get_world_size()
    num_batches = max((len(seeds) - 1) // (batch_size * world_size) + 1, 1) * world_size
    return [b.tolist() for b in torch.as_tensor(seeds, dtype=torch.int64).tensor_split(num_batches)[get_rank() :: world_size]]

def latents(shape, seeds, device):
    import edm_nets
    if not seeds:
        return torch.zeros([0, *shape], device=device), None
    rnd = edm_nets.StackedRandomGenerator(device, seeds)
    return rnd.randn([len(seeds), *shape], device=device), rnd

class Progress:
    def __init__(self, total, label=''):
        self.total, self.label, self.done = total, label, 0
        self.start = self.last = time.time()

    def update(self, n):
        self.done = min(self.done + n * get_world_size(), self.total)
        if time.time() - self.last > 10 or self.done == self.total:
            self.last = time.time()
            rate = self.done / max(self.last - self.start, 1e-9)
            print0(f'{self.label}{self.done}/{self.total} images  {rate:.1f} images/s  ETA {(self.total - self.done) / max(rate, 1e-9):.0f} s')

# One seed per image (its own latent, sampler noise and condition): image i is the same made alone or in any batch.
@torch.no_grad()
def generate(sampler, seeds, batch_size, device, label=''):
    progress = Progress(len(seeds), label)
    for batch_seeds in rank_batches(seeds, batch_size):
        if not batch_seeds:
            yield batch_seeds, torch.zeros([0, *sampler.image_shape], dtype=torch.uint8, device=device)
            continue
        z, rnd = latents(sampler.z_shape, batch_seeds, device)
        yield batch_seeds, to_uint8(sampler.sample(z, sampler.condition(batch_seeds, device), rnd))
        progress.update(len(batch_seeds))

#----------------------------------------------------------------------------
# Inception statistics of generated seeds or of images on disk, accumulated over all ranks.

def stats_of_seeds(sampler, seeds, detector, batch_size, device, keep_features, label=''):
    stats = FeatureStats(feature_dim(detector, sampler.image_shape, device), keep_features=keep_features, device=device)
    for _seeds, images in generate(sampler, seeds, batch_size, device, label):
        if len(images):
            stats.append(inception_features(detector, images))
    return stats

# EDM's fid.py picks a random subset of `num` images when the folder holds more.
def select_images(path, num=None, seed=0):
    total = len(dataset.ImageDataset(path))
    if num is not None and total < num:
        raise ValueError(f'Found {total} images in "{path}", but --num-images asks for {num}')
    idx = np.arange(total)
    if num is not None and total > num:
        np.random.RandomState(seed % (1 << 31)).shuffle(idx)
        idx = np.sort(idx[:num])
    return idx.tolist()

def stats_of_images(path, detector, batch_size, device, keep_features, num=None, seed=0):
    stats = FeatureStats(feature_dim(detector, image_shape(path), device), keep_features=keep_features, device=device)
    idx = select_images(path, num, seed)
    start = time.time()
    for images in iterate_images(path, batch_size, idx[get_rank() :: get_world_size()]):
        stats.append(inception_features(detector, images.to(device)))
    print0(f'{len(idx)} images from "{path}" in {time.time() - start:.0f} s')
    return stats

#----------------------------------------------------------------------------
# CLIP score: mean cosine similarity between CLIP image and text embeddings of each image and its caption
# (raw cosine, as Table 4 reports 0.29-0.31), with a local CLIP model folder (transformers format).

def check_clip_model(path):
    if not path or not os.path.isfile(os.path.join(path, 'config.json')):
        raise FileNotFoundError(f'CLIP model folder "{path}" not found (no config.json): pass a local transformers CLIP model folder with --clip-model')

def read_captions(path, hint='pass a text file with one caption per line, line i for image i (sorted file order)'):
    check_file(path, 'Captions file', hint)
    with open(path, encoding='utf-8') as f:
        captions = f.read().splitlines()
    if not captions:
        raise ValueError(f'Captions file "{path}" is empty: {hint}')
    return captions

# The captions.txt that `generate` writes with text-to-image samples: line i is the prompt of image i in file order.
def captions_of_images(path):
    if os.path.isfile(path) and zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            if 'captions.txt' in z.namelist():
                return z.read('captions.txt').decode('utf-8').splitlines()
    elif os.path.isfile(os.path.join(path, 'captions.txt')):
        return read_captions(os.path.join(path, 'captions.txt'))
    raise FileNotFoundError(f'No captions for "{path}": pass --captions (line i for image i in sorted file order); `evaluate.py generate` writes captions.txt with text-to-image samples')

def image_caption_batches(path, captions, batch_size):
    idx = list(range(len(dataset.ImageDataset(path))))[get_rank() :: get_world_size()]
    for begin, images in zip(range(0, len(idx), batch_size), iterate_images(path, batch_size, idx)):
        yield images, [captions[i] for i in idx[begin : begin + batch_size]]

# `batches` yields (uint8 NCHW images, their captions) on this rank; returns the mean over all ranks, and the count.
@torch.no_grad()
def clip_score(model_path, batches, device):
    from transformers import CLIPModel, CLIPProcessor
    check_clip_model(model_path)
    model = CLIPModel.from_pretrained(model_path, local_files_only=True).eval().to(device)
    processor = CLIPProcessor.from_pretrained(model_path, local_files_only=True)
    total = torch.zeros([2], dtype=torch.float64, device=device)
    for images, captions in batches:
        if not len(images):
            continue
        inputs = processor(text=list(captions), images=[to_pil(x).convert('RGB') for x in images], return_tensors='pt', padding=True, truncation=True, max_length=77)
        out = model(**{k: v.to(device) for k, v in inputs.items()})
        cosine = (out.image_embeds * out.text_embeds).sum(-1)      # both L2-normalised by CLIPModel
        total += torch.stack([cosine.double().sum(), torch.tensor(len(images), dtype=torch.float64, device=device)])
    total = fdistill.all_reduce(total)
    return float(total[0] / total[1]), int(total[1])

#----------------------------------------------------------------------------
# Latency (Table 4): seconds per image at batch 1, after warm-up, synchronising the GPU around the clock.
# Timed from latent and condition to decoded image: for text-to-image, from the prompt (text encoder included).

@torch.no_grad()
def latency(sampler, device, warmup=5, repeats=20):
    z, rnd = latents(sampler.z_shape, [0], device)
    cond = sampler.condition([0], device)
    for _ in range(warmup):
        sampler.sample(z, cond, rnd)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        sampler.sample(z, cond, rnd)
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
    return (time.perf_counter() - start) / repeats

#----------------------------------------------------------------------------
# Fig. 5 (Sec. 5.2): for generated samples y = G(z), the normalised weight h of the run's f and the squared
# score difference ||s_teacher(x; sigma) - s_fake(x; sigma)||^2 at x = y + sigma eps, sigma drawn as in
# training. Sorted by the score difference, h should fall where the teacher is unreliable (non-mode-seeking f).

RUN_KEYS = ('generator_kwargs', 'sigma_init', 'generator', 'fake_score', 'head', 'head_kwargs', 'options')
OPTION_KEYS = ('f', 'r_min', 'r_max', 'num_bins', 'disc_res')

@torch.no_grad()
def weight_diagnostic(ckpt, teacher, seeds, batch_size, device):
    import edm_nets
    opts = ckpt['options']
    generator = load_generator(ckpt, device)
    fake_score = edm_nets.EDMPrecond(**ckpt['generator_kwargs'])
    fake_score.load_state_dict(ckpt['fake_score'])
    fake_score.eval().requires_grad_(False).to(device)
    head = fdistill.DiscriminatorHead(**ckpt['head_kwargs'])
    head.load_state_dict(ckpt['head'])
    head.eval().requires_grad_(False).to(device)
    levels = fdistill.karras_sigmas(1000, 0.002, 80)                 # as train_edm.py: DMD2's 1000 levels
    edges = fdistill.sigma_bin_edges(levels, opts['num_bins'])
    rows = []
    progress = Progress(len(seeds), 'weights ')
    for batch_seeds in rank_batches(seeds, batch_size):
        if not batch_seeds:
            continue
        z, rnd = latents(one_step_sampler(generator).z_shape, batch_seeds, device)
        labels = class_labels(batch_seeds, generator.net.label_dim, device)
        y = generator(z, labels)                                                        # Alg. 1 line 4
        sigma = torch.cat([fdistill.sample_sigma(levels, 1, generator=torch.Generator().manual_seed(s)) for s in batch_seeds]).to(device)
        x_t = y + sigma.reshape(-1, 1, 1, 1) * rnd.randn_like(y)                         # Eq. 4
        D_teacher, features = teacher.forward_features(x_t, sigma, labels, opts['disc_res'])
        D_fake = fake_score(x_t, sigma, labels)
        score_diff = ((D_teacher - D_fake) / sigma.reshape(-1, 1, 1, 1) ** 2).square().flatten(1).sum(1)   # EDM Eq. 3
        logits = head(features)
        rows.append(torch.stack([torch.as_tensor(batch_seeds, device=device).double(), sigma.double(), logits.double(), score_diff.double()], 1))
        progress.update(len(batch_seeds))
    rows = torch.cat(rows) if rows else torch.zeros([0, 4], dtype=torch.float64, device=device)
    # Alg. 1 lines 6-9 on all N samples at once: ratio, per-bin stage 1, batch-mean stage 2 (global over ranks).
    logits, sigma = rows[:, 2].float(), rows[:, 1].float()
    h = fdistill.weights(logits, sigma, fdistill.divergence(opts['f']), opts['r_min'], opts['r_max'], edges)
    stats = fdistill.weight_stats(logits, h, sigma, opts['r_min'], opts['r_max'], edges)
    rows = gather_rows(torch.cat([rows, fdistill.ratio(rows[:, 2], opts['r_min'], opts['r_max'])[:, None].double(), h[:, None].double()], 1))
    rows = rows[rows[:, 3].argsort()].cpu().numpy()
    table = dict(zip(('seed', 'sigma', 'logit', 'score_diff', 'r', 'h'), rows.T.tolist()))
    table['seed'] = [int(s) for s in table['seed']]
    return table, stats

def plot_weights(table, f_name, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    n = len(table['h'])
    window = max(n // 50, 1)
    smooth = np.convolve(table['h'], np.ones(window) / window, mode='valid')
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.semilogy(table['score_diff'], color='tab:red', label='score difference')
    ax.set_xlabel('sample index (sorted by score difference)')
    ax.set_ylabel(r'$\|s_\phi - s_\psi\|^2$', color='tab:red')
    ax2 = ax.twinx()
    ax2.plot(table['h'], '.', markersize=2, alpha=0.3, color='tab:blue')
    ax2.plot(np.arange(len(smooth)) + window // 2, smooth, color='tab:blue', label=f'h (moving mean of {window})')
    ax2.set_ylabel('normalised h', color='tab:blue')
    ax.set_title(f'{f_name}: normalised h vs score difference, {n} samples (Fig. 5)')
    ax2.legend(handles=[*ax.get_lines(), ax2.get_lines()[1]], loc='upper left', fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)

#----------------------------------------------------------------------------
# Plots of a run, for reading it ("Reading a run" in README.md): stats.jsonl (and fid-snapshots.json where
# `evaluate.py fid` scored the run's snapshots) as one PNG per group, panels sharing the iteration axis.
# Dashed grey lines mark where a run at chance sits (discriminator loss 2 ln 2, accuracy 0.5, r = 1, ESS 1)
# and the clip of r.

def read_stats(run):
    path = os.path.join(run, 'stats.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: pass a run directory written by train_cifar.py, train_imagenet.py or train_t2i.py')
    stats = [json.loads(line) for line in open(path) if line.strip()]
    if not stats:
        raise ValueError(f'{path} is empty: the run has not logged yet (every --log-every iterations)')
    return stats

# The stage-1 sigma bins of a run, as "a-b" labels (training_loop: fdistill.sigma_bin_edges on the task's levels).
def bin_labels(options):
    levels = sd_unet.SIGMAS.float() if options.get('sd') else fdistill.karras_sigmas(1000, 0.002, 80)
    n = options.get('num_bins', 10)
    cuts = [float(levels[int(0.02 * len(levels))])] + fdistill.sigma_bin_edges(levels, n).tolist() + [float(levels[int(0.98 * len(levels)) - 1])]
    return [f'σ {cuts[k]:.3g}–{cuts[k + 1]:.3g}' for k in range(n)]

def run_figures(stats, options, fid=None):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    it = np.array([s['iteration'] for s in stats])
    series = lambda key: np.array([s.get(key, np.nan) for s in stats], dtype=float)
    has = lambda key: any(key in s for s in stats)
    bins = bin_labels(options)
    colors = plt.cm.viridis(np.linspace(0, 0.9, len(bins)))
    per_bin = lambda prefix: [(f'{prefix}{k}', bins[k], dict(color=colors[k])) for k in range(len(bins)) if has(f'{prefix}{k}')]
    clip = [options['r_min'], options['r_max']] if 'r_min' in options else []
    # group -> panels: (title, [(key, label, style)], reference ys, log y)
    groups = dict(
        losses=[('f-distill loss (generator steps)', [('loss_fdistill', 'loss_fdistill', {})], [], False),
                ('GAN losses (chance: D loss 2 ln 2)', [('loss_gan_d', 'discriminator', {}), ('loss_gan_g', 'generator', {})], [2 * np.log(2)], False),
                ('fake-score DSM', [('loss_dsm', 'loss_dsm', {})], [], True),
                ('R1 penalty', [('loss_r1', 'loss_r1', {})], [], True),
                ('LPIPS regression', [('loss_reg', 'loss_reg', {})], [], False)],
        weights=[('density ratio r (mean, min, max; r = 1 and the clip dashed)', [('r_mean', 'mean', {}), ('r_min', 'min', {}), ('r_max', 'max', {})], [1] + clip, True),
                 ('fraction of r at the clip', [('r_clipped', 'r_clipped', {})], [], False),
                 ('normalised weight h̄ (min, max)', [('h_min', 'min', {}), ('h_max', 'max', {})], [1], True),
                 ('effective sample size of h̄', [('h_ess', 'ESS', {})], [1], False)],
        discriminator=[('discriminator accuracy on the critic batch, per σ bin (chance 0.5)', [('disc_acc', 'all bins', dict(color='black', linewidth=2))] + per_bin('disc_acc_bin'), [0.5], False),
                       ('spread (std) of h̄ within each σ bin', per_bin('h_std_bin'), [], False),
                       ('mean logit, real and generated', [('logit_real', 'real', {}), ('logit_fake', 'generated', {})], [0], False)],
        speed=[('images / s', [('images_per_sec', 'images/s', {})], [], False),
               ('peak memory (GB)', [('memory_gb', 'memory_gb', {})], [], False),
               ('learning rate', [('lr', 'generator, fake score', {}), ('lr_head', 'discriminator head', {})], [], True)])
    figures = []
    for name, panels in groups.items():
        panels = [(title, [line for line in lines if has(line[0])], ref, log) for title, lines, ref, log in panels]
        panels = [panel for panel in panels if panel[1]]
        if not panels:
            continue
        fig, axes = plt.subplots(len(panels), 1, sharex=True, figsize=(10, 2.2 * len(panels) + 0.6), squeeze=False)
        for ax, (title, lines, ref, log) in zip(axes[:, 0], panels):
            for key, label, style in lines:
                y = series(key)
                ax.plot(it[np.isfinite(y)], y[np.isfinite(y)], label=label, **style)
            for y in ref:
                ax.axhline(y, color='grey', linestyle='--', linewidth=0.8)
            lo, hi = min([np.nanmin(series(k)) for k, _, _ in lines] + ref), max([np.nanmax(series(k)) for k, _, _ in lines] + ref)
            if log and lo > 0 and hi > 10 * lo:                 # log only where the values (or r's clip) span a decade
                ax.set_yscale('log')
            ax.set_title(title, fontsize=9)
            ax.grid(alpha=0.3)
            if len(lines) > 1:
                ax.legend(fontsize=7, loc='center left', bbox_to_anchor=(1.01, 0.5))
        axes[-1, 0].set_xlabel('iteration')
        fig.suptitle(f'{name}: --f {options.get("f", "?")}', fontsize=10)
        fig.tight_layout()
        figures.append((name, fig))
    if fid is not None and fid.get('snapshots'):
        figures.append(('fid', fid_figure(fid['snapshots'], fid.get('best'))))
    return figures

def cmd_plot(args):
    if not os.path.exists(args.ckpt):
        raise FileNotFoundError(f'--ckpt {args.ckpt} not found: pass a run directory (it holds stats.jsonl)')
    run = args.ckpt if os.path.isdir(args.ckpt) else os.path.dirname(os.path.abspath(args.ckpt))
    stats = read_stats(run)
    options_path = os.path.join(run, 'training_options.json')
    options = json.load(open(options_path)) if os.path.isfile(options_path) else {}
    fid_path = os.path.join(run, 'fid-snapshots.json')
    fid = json.load(open(fid_path)) if os.path.isfile(fid_path) else None
    outdir = args.outdir or os.path.join(run, 'plots')
    os.makedirs(outdir, exist_ok=True)
    for name, fig in run_figures(stats, options, fid):
        path = os.path.join(outdir, f'{name}.png')
        save_figure(fig, path)
        print0(f'wrote {path}')

def save_figure(fig, path):
    import matplotlib.pyplot as plt
    rundir.atomic_write(path, lambda f: fig.savefig(f, format='png', dpi=110))
    plt.close(fig)

# FID against iteration, the best snapshot starred: fid-snapshots.png (fid --snapshots) and plots/fid.png (plot).
def fid_figure(entries, best):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    entries = sorted(entries, key=lambda e: e['iteration'])
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot([e['iteration'] for e in entries], [e['fid'] for e in entries], 'o-', markersize=3, label='FID of snapshot')
    if best:
        ax.plot([best['iteration']], [best['fid']], '*', color='tab:red', markersize=12, label=f'best: iteration {best["iteration"]}, FID {best["fid"]:.3g}')
    ax.set_xlabel('iteration')
    ax.set_ylabel(f'FID ({entries[-1].get("num_images", "?")} images)')
    ax.set_yscale('log')
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig

#----------------------------------------------------------------------------
# Command line. Every input is checked before any network runs; errors are one line.

def write_json(path, data):
    if os.path.dirname(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
    rundir.atomic_write(path, lambda f: f.write(json.dumps(data, indent=2).encode()))

PROMPTS_HINT = 'pass --captions FILE with one prompt per line (e.g. the MS-COCO 30k captions); seed s gets line s mod N'

# The SD folder and the prompts of a text-to-image source (a train_t2i.py checkpoint, or --sd alone for the teacher).
def check_t2i(args, ckpt, need_prompts=True):
    check_sd_folder(sd_folder(args, ckpt), from_ckpt=args.sd is None)
    if args.captions is None:
        if need_prompts:
            raise FileNotFoundError(f'Text-to-image sampling needs prompts: {PROMPTS_HINT}')
        return [LATENCY_PROMPT]
    return read_captions(args.captions, PROMPTS_HINT)

# Which generator a command evaluates: returns (its checkpoint or None, its prompts or None for EDM).
def check_source(args, need_prompts=True):
    if args.ckpt is None and args.teacher is None and args.sd is None or args.ckpt is not None and args.teacher is not None:
        raise ValueError('pass one of --ckpt (a run\'s one-step generator), --teacher (an EDM teacher .pkl with its sampler) or --sd alone (SD v1.5 with DDIM)')
    if args.teacher is not None:
        if args.sd is not None:
            raise ValueError('--teacher is an EDM .pkl and --sd an SD v1.5 folder: pass one')
        check_file(args.teacher, 'Teacher pickle', TEACHER_HINT)
        return None, None
    ckpt = load_checkpoint(args.ckpt) if args.ckpt is not None else None
    if ckpt is not None and not is_t2i(ckpt):
        if args.sd is not None:
            raise ValueError(f'--sd: "{ckpt["path"]}" is an EDM run, not a text-to-image one')
        return ckpt, None
    return ckpt, check_t2i(args, ckpt, need_prompts)

def load_source(args, ckpt, prompts, device):
    if prompts is not None:
        sd = sd_unet.load_sd(sd_folder(args, ckpt), device)
        if ckpt is not None:
            del sd['unet']                                  # the teacher's UNet; the student has its own
            return sd_one_step_sampler(ckpt, sd, prompts, args.resolution, args.bf16, device)
        return sd_teacher_sampler(sd, prompts, args.resolution, args.bf16, args.steps or SD_TEACHER_STEPS, args.cfg)
    if ckpt is not None:
        return one_step_sampler(load_generator(ckpt, device))
    return teacher_sampler(load_teacher(args.teacher, device), args.sampler, args.steps)

def describe_source(args, ckpt, sampler):
    return dict(source=ckpt['path'] if ckpt is not None else args.teacher or args.sd, **sampler.info)

def cmd_generate(args):
    ckpt, prompts = check_source(args)
    seeds = parse_seeds(args.seeds)
    device = init_distributed()
    sampler = load_source(args, ckpt, prompts, device)
    to_zip = args.outdir.lower().endswith('.zip')
    writer = ImageWriter(args.outdir) if get_rank() == 0 or not to_zip else None
    for batch_seeds, images in generate(sampler, seeds, args.batch, device):
        if to_zip:                                          # one zip: rank 0 writes every rank's images
            batch_seeds = gather_rows(torch.as_tensor(batch_seeds, dtype=torch.int64, device=device)).tolist()
            images = gather_rows(images)
        if writer is not None:
            for seed, image in zip(batch_seeds, images):
                writer.write(seed, image)
    if prompts is not None and get_rank() == 0:             # line i: the prompt of image i in file order
        writer.write_file('captions.txt', ''.join(p + '\n' for p in sampler.condition(sorted(set(seeds)), device)).encode('utf-8'))
    if writer is not None:
        writer.close()
    print0(f'Wrote {len(seeds)} images to "{args.outdir}"' + (' with captions.txt' if prompts is not None else ''))

def cmd_ref(args):
    check_detector(args.detector)
    num = len(dataset.ImageDataset(args.data))
    if num < 2:
        raise ValueError(f'"{args.data}" holds {num} image; statistics need at least 2')
    device = init_distributed()
    detector = load_detector(args.detector, device)
    stats = stats_of_images(args.data, detector, args.batch, device, keep_features=not args.no_features)
    mu, sigma = stats.mu_sigma()
    features = None if args.no_features else stats.all_features().cpu().numpy()
    if get_rank() == 0:
        save_ref(args.dest, mu, sigma, features)
    print0(f'Saved reference statistics of {num} images to "{args.dest}"')

def cmd_fid(args):
    pr = not args.no_pr
    need = args.k + 1 if pr else 2
    what = f'precision/recall with k={args.k}' if pr else 'FID'
    check_detector(args.detector)
    if args.images is not None:
        if args.ckpt is not None or args.teacher is not None or args.sd is not None:
            raise ValueError('pass one of --ckpt, --teacher, --sd or --images')
        num_images = args.num_images or 50000
        found = len(dataset.ImageDataset(args.images))
        if found < num_images:
            raise ValueError(f'found {found} images in "{args.images}", but --num-images asks for {num_images}')
        ckpt, prompts, seed_sets = None, None, [None]
    else:
        ckpt, prompts = check_source(args)
        num_images = args.num_images or (len(prompts) if prompts is not None else 50000)
        seed_sets = parse_seed_sets(args.seeds) if args.seeds else [list(range(i * num_images, (i + 1) * num_images)) for i in range(args.repeats)]
    if args.snapshots:
        snapshots = check_snapshots(args, seed_sets)
        pr, need = False, 2
    size = min(num_images if s is None else len(s) for s in seed_sets)
    if size < need:
        raise ValueError(f'each sample set needs at least {need} images for {what}, got {size}')
    if args.ref.lower().endswith('.npz'):
        ref = load_ref(args.ref, need_features=pr)
        num_ref = len(ref['features']) if pr else 2
    else:
        ref, num_ref = None, len(dataset.ImageDataset(args.ref))
    if num_ref < need:
        raise ValueError(f'reference "{args.ref}" has {num_ref} images/feature vectors; {what} needs at least {need}')

    device = init_distributed()
    detector = load_detector(args.detector, device)
    if ref is None:
        stats = stats_of_images(args.ref, detector, args.batch, device, keep_features=pr)
        mu, sigma = stats.mu_sigma()
        ref = dict(mu=mu, sigma=sigma, features=stats.all_features() if pr else None)
    if args.snapshots:
        return fid_of_snapshots(args, snapshots, prompts, seed_sets[0], detector, ref, device)
    real_features = torch.as_tensor(ref['features'], device=device) if pr else None
    sampler = load_source(args, ckpt, prompts, device) if args.images is None else None
    dim = feature_dim(detector, sampler.image_shape if sampler is not None else image_shape(args.images), device)
    if dim != len(ref['mu']):
        raise ValueError(f'--ref "{args.ref}" holds {len(ref["mu"])}-d features but --detector "{args.detector}" gives {dim}-d ones: build the reference with the same detector (evaluate.py ref --detector ...)')
    results = []
    for i, seeds in enumerate(seed_sets):
        if seeds is None:
            stats = stats_of_images(args.images, detector, args.batch, device, keep_features=pr, num=num_images, seed=args.seed)
        else:
            stats = stats_of_seeds(sampler, seeds, detector, args.batch, device, keep_features=pr, label=f'[set {i + 1}/{len(seed_sets)}] ')
        num, (mu, sigma) = stats.total(), stats.mu_sigma()             # collectives: every rank
        fake_features = stats.all_features() if pr else None
        if get_rank() == 0:
            result = dict(seeds=f'{seeds[0]}-{seeds[-1]}' if seeds else None, num=num, fid=frechet_distance(mu, sigma, ref['mu'], ref['sigma']))
            if pr:
                result['precision'], result['recall'] = precision_recall(real_features, fake_features, args.k)
            print0('  '.join(f'{k} {v:.4f}' if isinstance(v, float) else f'{k} {v}' for k, v in result.items()))
            results.append(result)
    if get_rank() == 0:
        summary = {m: dict(min=min(r[m] for r in results), mean=float(np.mean([r[m] for r in results])))
                   for m in ('fid', 'precision', 'recall') if m in results[0]}
        source = describe_source(args, ckpt, sampler) if sampler is not None else dict(source=args.images)
        write_json(args.report, dict(source, ref=args.ref, k=args.k, sets=results, summary=summary))
        print0(f'FID min {summary["fid"]["min"]:.4f} mean {summary["fid"]["mean"]:.4f} over {len(results)} set(s); wrote "{args.report}"')

# Model selection: FID of every generator snapshot of a run (training_loop writes snapshot-<iteration>.pt every
# --snap-every, from iteration 0), all on the same seeds, so the curve shows the run and not the seeds. Results go
# to <run>/fid-snapshots.json and .png after each snapshot; a rerun reuses the entries of the same images and ref.
def check_snapshots(args, seed_sets):
    if args.images is not None or args.teacher is not None or not os.path.isdir(args.ckpt or ''):
        raise ValueError(f'--snapshots scores the snapshots of a run: pass --ckpt RUN_DIR (got --ckpt {args.ckpt})')
    if len(seed_sets) != 1:
        raise ValueError('--snapshots takes one seed set per snapshot: drop --repeats, or pass one range to --seeds')
    snapshots = snapshots_of(args.ckpt)
    if not snapshots:
        raise FileNotFoundError(f'No snapshot-<iteration>.pt in "{args.ckpt}": training_loop.py writes them every --snap-every iterations')
    return snapshots

def fid_of_snapshots(args, snapshots, prompts, seeds, detector, ref, device):
    path_json, path_png = os.path.join(args.ckpt, 'fid-snapshots.json'), os.path.join(args.ckpt, 'fid-snapshots.png')
    old = json.load(open(path_json)) if os.path.isfile(path_json) else {}
    done = {e['path']: e for e in old.get('snapshots', []) if e['num_images'] == len(seeds) and old.get('ref') == args.ref}
    entries = []
    for i, path in enumerate(snapshots):
        if path not in done:
            ckpt = load_checkpoint(path)
            stats = stats_of_seeds(load_source(args, ckpt, prompts, device), seeds, detector, args.batch, device, keep_features=False,
                                   label=f'[snapshot {i + 1}/{len(snapshots)}: iteration {ckpt["iteration"]}] ')
            mu, sigma = stats.mu_sigma()
            done[path] = dict(iteration=int(ckpt['iteration']), path=path, fid=frechet_distance(mu, sigma, ref['mu'], ref['sigma']), num_images=len(seeds))
        entries.append(done[path])
        best = min(entries, key=lambda e: e['fid'])
        print0(f'iteration {entries[-1]["iteration"]}  FID {entries[-1]["fid"]:.4f}  ({entries[-1]["num_images"]} images)')
        if get_rank() == 0:
            write_json(path_json, dict(snapshots=entries, best=dict(iteration=best['iteration'], path=best['path'], fid=best['fid']), ref=args.ref))
            save_figure(fid_figure(entries, best), path_png)
    print0(f'Best: iteration {best["iteration"]}, FID {best["fid"]:.4f} ({best["path"]}); wrote "{path_json}" and "{path_png}"')

# CLIP score of a folder/zip of images with their captions, or of a text-to-image source's images made on the fly.
def cmd_clip(args):
    check_clip_model(args.clip_model)
    if args.images is not None:
        if args.ckpt is not None or args.teacher is not None or args.sd is not None:
            raise ValueError('pass one of --images or a text-to-image source (--ckpt or --sd)')
        num = len(dataset.ImageDataset(args.images))
        captions = read_captions(args.captions) if args.captions is not None else captions_of_images(args.images)
        if len(captions) < num:
            raise ValueError(f'{num} images but {len(captions)} captions for "{args.images}": image i (sorted file order) needs caption line i')
        device = init_distributed()
        batches, source = image_caption_batches(args.images, captions, args.batch), dict(source=args.images)
    else:
        ckpt, prompts = check_source(args)
        if prompts is None:
            raise ValueError('CLIP score needs a text-to-image source: a train_t2i.py run (--ckpt) or an SD v1.5 folder (--sd), or --images')
        seeds = parse_seeds(args.seeds) if args.seeds else list(range(len(prompts)))
        device = init_distributed()
        sampler = load_source(args, ckpt, prompts, device)
        batches = ((images, sampler.condition(s, device)) for s, images in generate(sampler, seeds, args.batch, device))
        source = describe_source(args, ckpt, sampler)
    score, num = clip_score(args.clip_model, batches, device)
    print0(f'CLIP score {score:.4f} over {num} images')
    if get_rank() == 0 and args.report:
        write_json(args.report, dict(source, captions=args.captions, clip_model=args.clip_model, num=num, clip_score=score))

# Table 4's latency column: the one-step generator (with --ckpt) and the teacher's multi-step sampler -- the EDM
# teacher (--teacher, or the run's options['teacher']) for EDM runs, SD v1.5 with DDIM (--steps, --cfg) for
# text-to-image runs (the checkpoint's SD folder, or --sd) -- each from condition to decoded image at batch 1.
def cmd_latency(args):
    if args.ckpt is None and args.teacher is None and args.sd is None:
        raise ValueError('pass --ckpt (a run; its teacher too), --teacher (an EDM .pkl) or --sd (an SD v1.5 folder)')
    ckpt = load_checkpoint(args.ckpt) if args.ckpt else None
    t2i = is_t2i(ckpt) or ckpt is None and args.teacher is None
    if t2i:
        prompts = check_t2i(args, ckpt, need_prompts=False)
    else:
        teacher_path = args.teacher or (ckpt or {}).get('options', {}).get('teacher')
        check_file(teacher_path, 'Teacher pickle', TEACHER_HINT)
    device = init_distributed()
    report = dict(device=torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu', batch=1, bf16=args.bf16 if t2i else False)
    if t2i:
        report['timed'] = 'prompt to decoded image: text encoder, UNet pass(es), VAE decoder'
        sd = sd_unet.load_sd(sd_folder(args, ckpt), device)
        one_step = sd_one_step_sampler(ckpt, sd, prompts, args.resolution, args.bf16, device) if ckpt is not None else None
        teacher = sd_teacher_sampler(sd, prompts, args.resolution, args.bf16, args.steps or SD_TEACHER_STEPS, args.cfg)
    else:
        report['timed'] = 'latent and label to image: the network pass(es)'
        one_step = one_step_sampler(load_generator(ckpt, device)) if ckpt is not None else None
        teacher = teacher_sampler(load_teacher(teacher_path, device), args.sampler, args.steps)
    for name, sampler in (('one_step', one_step), ('teacher', teacher)):
        if sampler is not None:
            report.update({f'{name}_{k}': v for k, v in sampler.info.items()})
            report[f'{name}_seconds'] = latency(sampler, device, args.warmup, args.repeats)
    print0('  '.join(f'{k} {v:.4g}' if isinstance(v, float) else f'{k} {v}' for k, v in report.items()))
    if args.report and get_rank() == 0:
        write_json(args.report, report)

def cmd_weights(args):
    ckpt = load_checkpoint(args.ckpt)
    if is_t2i(ckpt):
        raise ValueError(f'"{ckpt["path"]}" is a text-to-image run: the Fig. 5 diagnostic is implemented for EDM runs (train_cifar.py, train_imagenet.py)')
    missing = [k for k in RUN_KEYS if ckpt.get(k) is None] + [k for k in OPTION_KEYS if k not in ckpt.get('options', {})]
    if missing:
        raise ValueError(f'"{ckpt["path"]}" lacks {", ".join(missing)}: not a checkpoint of training_loop.py')
    teacher_path = args.teacher or ckpt['options'].get('teacher')
    check_file(teacher_path, 'Teacher pickle', TEACHER_HINT)
    if args.num_images < 2:
        raise ValueError(f'--num-images {args.num_images}: the diagnostic needs at least 2 samples')
    outdir = args.outdir or os.path.dirname(ckpt['path'])
    device = init_distributed()
    if args.num_images < get_world_size():
        raise ValueError(f'--num-images {args.num_images}: every one of the {get_world_size()} processes needs a sample')
    teacher = load_teacher(teacher_path, device)
    teacher.use_fp16 = False                                # as in training (train_edm.py)
    table, stats = weight_diagnostic(ckpt, teacher, list(range(args.seed, args.seed + args.num_images)), args.batch, device)
    if get_rank() == 0:
        os.makedirs(outdir, exist_ok=True)
        name = os.path.splitext(os.path.basename(ckpt['path']))[0]
        f_name = fdistill.divergence(ckpt['options']['f']).name
        plot_weights(table, f_name, os.path.join(outdir, f'weights-{name}.png'))
        corr = float(np.corrcoef(np.log(np.maximum(table['score_diff'], 1e-30)), table['h'])[0, 1])
        write_json(os.path.join(outdir, f'weights-{name}.json'), dict(checkpoint=ckpt['path'], f=ckpt['options']['f'], num=args.num_images,
            corr_h_log_score_diff=corr, stats=stats, samples_sorted_by_score_diff=table))
        print0(f'{f_name}: corr(h, log score difference) = {corr:.3f}; wrote {os.path.join(outdir, f"weights-{name}.png")} and .json')

#----------------------------------------------------------------------------
# Export: the one-step student in the formats people load elsewhere. An SD student becomes a diffusers
# UNet2DConditionModel folder, sampled in one step at t = 999 with SD's own VAE and text encoder; an EDM
# student becomes generator.safetensors (EDMPrecond's keys, as NVIDIA's networks) + generator.json, read back
# by edm_nets.load_generator. The EMA weights when the run kept them. A run, a checkpoint or a snapshot file.

SD_EXPORT_README = """# One-step text-to-image generator distilled with f-distill

From `{source}` (iteration {iteration}, `{weights}` weights, --f {f}). A diffusers `UNet2DConditionModel`;
it turns noise at t = 999 into an eps prediction, converted to x0 in one step (no scheduler). The VAE, text
encoder and tokenizer are those of the SD v1.5 folder it was distilled from.

```python
import PIL.Image
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

sd = {sd!r}                                      # the SD v1.5 folder (or hub id) the student was distilled from
unet = UNet2DConditionModel.from_pretrained({dest!r}).eval()
vae = AutoencoderKL.from_pretrained(sd, subfolder='vae').eval()
text_encoder = CLIPTextModel.from_pretrained(sd, subfolder='text_encoder').eval()
tokenizer = CLIPTokenizer.from_pretrained(sd, subfolder='tokenizer')
prompt, seed = 'a photograph of an astronaut riding a horse', 0
size = {resolution} // 2 ** (len(vae.config.block_out_channels) - 1)        # latent size of the training resolution

with torch.no_grad():
    ids = tokenizer([prompt], padding='max_length', max_length=tokenizer.model_max_length, truncation=True, return_tensors='pt').input_ids
    ctx = text_encoder(ids)[0]
    z = torch.randn([1, unet.config.in_channels, size, size], generator=torch.Generator().manual_seed(seed))
    abar = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)[999]  # SD's schedule
    x0 = (z - (1 - abar).sqrt().float() * unet(z, 999, ctx).sample) / abar.sqrt().float()                # eps -> x0 at t = 999
    image = vae.decode(x0 / vae.config.scaling_factor).sample.float().clamp(-1, 1)
PIL.Image.fromarray((image * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()).save('sample.png')
```
"""

EDM_EXPORT_README = """# One-step generator distilled with f-distill

From `{source}` (iteration {iteration}, `{weights}` weights, --f {f}). `generator.safetensors` is the
state dict of EDM's `EDMPrecond` (the keys of NVIDIA's released networks), `generator.json` its constructor
arguments and `sigma_init`; the generator is G(z, labels) = D(sigma_init z; sigma_init, labels).

```python
import torch
import edm_nets                                  # from f-distill; or NVlabs/edm's EDMPrecond(**kwargs) with the same state dict

generator = edm_nets.load_generator({dest!r})
z = torch.randn([16, generator.net.img_channels, generator.net.img_resolution, generator.net.img_resolution])
labels = torch.eye(generator.net.label_dim)[torch.arange(16) % generator.net.label_dim] if generator.net.label_dim else None
with torch.no_grad():
    images = generator(z, labels)                # in [-1, 1]
```
"""

# Weights as safetensors (format 'pt', as diffusers writes them) and a JSON config, each written atomically.
def write_export(dest, weights_name, state_dict, config_name, config):
    import safetensors.torch
    data = safetensors.torch.save({k: v.contiguous() for k, v in state_dict.items()}, metadata=dict(format='pt'))
    os.makedirs(dest, exist_ok=True)
    rundir.atomic_write(os.path.join(dest, weights_name), lambda f: f.write(data))
    write_json(os.path.join(dest, config_name), config)

def cmd_export(args):
    ckpt = load_checkpoint(args.ckpt)
    marker = os.path.join(args.dest, 'config.json' if is_t2i(ckpt) else 'generator.safetensors')
    if os.path.exists(marker):
        raise FileExistsError(f'--dest {args.dest} already holds an export ({marker}): pass a new folder')
    weights = 'generator_ema' if ckpt.get('generator_ema') is not None else 'generator'
    info = dict(source=ckpt['path'], iteration=ckpt.get('iteration'), weights=weights, f=ckpt.get('options', {}).get('f'))
    if is_t2i(ckpt):
        state = {k[len('unet.'):]: v for k, v in ckpt[weights].items()}        # sd_unet.SDGenerator holds the UNet as 'unet'
        write_export(args.dest, 'diffusion_pytorch_model.safetensors', state, 'config.json', sd_unet.diffusers_unet_config(ckpt['unet_config']))
        readme = SD_EXPORT_README.format(**info, dest=args.dest, sd=ckpt['sd'], resolution=ckpt['options']['resolution'])
    else:
        import edm_nets
        generator = load_generator(ckpt, 'cpu')
        write_export(args.dest, 'generator.safetensors', generator.net.state_dict(), 'generator.json', edm_nets.generator_spec(generator, info))
        readme = EDM_EXPORT_README.format(**info, dest=args.dest)
    rundir.atomic_write(os.path.join(args.dest, 'README.md'), lambda f: f.write(readme.encode()))
    print0(f'Exported the {weights} weights of "{ckpt["path"]}" to "{args.dest}" (see its README.md)')

def parse_args(argv=None):
    parser = flags.ArgumentParser(description='Evaluate f-distill generators: images, FID, precision/recall, CLIP score, latency, Fig. 5.')
    sub = parser.add_subparsers(dest='command', required=True)

    def source(p, teacher_help='EDM teacher .pkl: evaluate the teacher with its sampler instead of a run', captions_help=PROMPTS_HINT):
        p.add_argument('--ckpt', help='Run directory (its latest checkpoint-*.pt) or one checkpoint file; an EDM or a text-to-image (train_t2i.py) run')
        p.add_argument('--teacher', help=teacher_help)
        p.add_argument('--sampler', default='cifar10', choices=['cifar10', 'imagenet64'], help="EDM teacher sampler preset: EDM's 18-step Heun (35 NFE) or ImageNet's 256-step stochastic one")
        p.add_argument('--steps', type=flags.positive_int, default=None, help=f'Teacher sampler steps (default: the EDM preset\'s; SD\'s DDIM: {SD_TEACHER_STEPS}, Table 4)')
        p.add_argument('--sd', help="Local diffusers-format SD v1.5 folder: alone, the SD teacher with DDIM; with a text-to-image --ckpt, overrides the checkpoint's folder")
        p.add_argument('--captions', help=captions_help)
        p.add_argument('--cfg', type=float, default=3.0, help='Classifier-free guidance of the SD teacher\'s DDIM (Table 4: 3); the one-step generator has it distilled in')
        p.add_argument('--resolution', type=flags.positive_int, default=None, help='Text-to-image resolution in pixels (default: the run\'s --resolution; the SD teacher: its UNet\'s, 512)')
        p.add_argument('--bf16', action='store_true', help='bf16 autocast for the SD text encoder, UNet and VAE')

    p = sub.add_parser('generate', help='Write images of seeds to a PNG folder or .zip')
    source(p)
    p.add_argument('--outdir', required=True, help='Output folder, or a path ending in .zip; files are <seed>.png')
    p.add_argument('--seeds', default='0-63', help='Seeds, e.g. 0-49999 or 0-9,100-109')
    p.add_argument('--batch', type=flags.positive_int, default=64, help='Images per batch and GPU')
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser('ref', help='Reference statistics of a dataset: EDM .npz (mu, sigma) plus features for precision/recall')
    p.add_argument('--data', required=True, help='Dataset folder or .zip of PNGs (EDM dataset_tool layout)')
    p.add_argument('--dest', required=True, help='Output .npz')
    p.add_argument('--detector', required=True, help="NVIDIA's inception-2015-12-05.pt, or another TorchScript feature detector; TorchScript is a program that runs, so pass only a file you trust")
    p.add_argument('--no-features', action='store_true', help='Store only mu and sigma (no precision/recall later)')
    p.add_argument('--batch', type=flags.positive_int, default=64, help='Images per batch and GPU')
    p.set_defaults(func=cmd_ref)

    p = sub.add_parser('fid', help='FID and precision/recall of a run, a teacher or an image folder against a reference')
    source(p)
    p.add_argument('--images', help='A folder/.zip of images to evaluate instead of generating')
    p.add_argument('--ref', required=True, help='Reference .npz (EDM format; with features for precision/recall) or a dataset folder/.zip')
    p.add_argument('--detector', required=True, help="NVIDIA's inception-2015-12-05.pt, or another TorchScript feature detector; TorchScript is a program that runs, so pass only a file you trust")
    p.add_argument('--num-images', type=flags.positive_int, default=None, help='Images per set (default 50k, Tables 2-3; text-to-image: one per caption, e.g. MS-COCO 30k)')
    p.add_argument('--repeats', type=flags.positive_int, default=1, help='Seed sets 0..num-1, num..2num-1, ...; the literature reports the min of 3')
    p.add_argument('--seeds', help='Explicit seed sets, one per comma, e.g. 0-49999,50000-99999 (overrides --num-images/--repeats)')
    p.add_argument('--seed', type=int, default=0, help='With --images: which random subset of --num-images images when the folder holds more')
    p.add_argument('--k', type=flags.positive_int, default=3, help='Neighbourhood size of precision/recall (Kynkaenniemi et al.: 3)')
    p.add_argument('--no-pr', action='store_true', help='FID only (e.g. against an EDM .npz without features)')
    p.add_argument('--report', default='metrics.json', help='Output JSON: every set, and min/mean over sets')
    p.add_argument('--snapshots', action='store_true', help='Score every snapshot-*.pt of the run --ckpt RUN_DIR (FID on --num-images seeds each, e.g. 10000); writes RUN_DIR/fid-snapshots.json and .png, names the best')
    p.add_argument('--batch', type=flags.positive_int, default=64, help='Images per batch and GPU')
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser('clip', help='CLIP score (mean cosine of image and caption embeddings, Table 4) of images, or of a text-to-image source')
    source(p, captions_help='Text file, one caption per line: of --images (line i for the i-th file in sorted order; default: their captions.txt), or the prompts of a source (seed s: line s mod N)')
    p.add_argument('--images', help='Folder/.zip of images to score instead of generating')
    p.add_argument('--seeds', help='Seeds to generate with a source (default: one per caption, 0..N-1)')
    p.add_argument('--clip-model', required=True, help='Local transformers CLIP model folder (config.json, weights, tokenizer, preprocessor)')
    p.add_argument('--report', default=None, help='Output JSON')
    p.add_argument('--batch', type=flags.positive_int, default=32, help='Images per batch and GPU')
    p.set_defaults(func=cmd_clip)

    p = sub.add_parser('latency', help='Seconds per image at batch 1: one-step generator vs teacher sampler (Table 4)')
    source(p, teacher_help="EDM teacher .pkl (default: the run's options['teacher'])")
    p.add_argument('--warmup', type=flags.non_negative_int, default=5, help='Untimed calls first')
    p.add_argument('--repeats', type=flags.positive_int, default=20, help='Timed calls, averaged')
    p.add_argument('--report', default=None, help='Output JSON')
    p.set_defaults(func=cmd_latency)

    p = sub.add_parser('plot', help='PNGs of a run\'s stats.jsonl (losses, weights, discriminator per sigma bin, speed; FID per snapshot) into RUN/plots/')
    p.add_argument('--ckpt', required=True, help='Run directory (or a file inside it)')
    p.add_argument('--outdir', default=None, help='Where the PNGs go (default: RUN/plots)')
    p.set_defaults(func=cmd_plot)

    p = sub.add_parser('export', help='Write the one-step student as a diffusers UNet folder (SD) or EDMPrecond safetensors + JSON (EDM)')
    p.add_argument('--ckpt', required=True, help='Run directory (its latest checkpoint-*.pt), one checkpoint file or one snapshot file')
    p.add_argument('--dest', required=True, help='Output folder (created): config.json + diffusion_pytorch_model.safetensors, or generator.safetensors + generator.json; and README.md')
    p.set_defaults(func=cmd_export)

    p = sub.add_parser('weights', help='Fig. 5: normalised h and score difference of N generated samples, sorted')
    p.add_argument('--ckpt', required=True, help='Run directory (its latest checkpoint-*.pt) or one checkpoint file')
    p.add_argument('--teacher', help="EDM teacher .pkl (default: the run's options['teacher'])")
    p.add_argument('--num-images', type=flags.positive_int, default=6400, help='Generated samples (6.4k in Fig. 5)')
    p.add_argument('--seed', type=int, default=0, help='First seed')
    p.add_argument('--outdir', default=None, help='Where weights-<checkpoint>.png/.json go (default: the run directory)')
    p.add_argument('--batch', type=flags.positive_int, default=64, help='Samples per batch and GPU')
    p.set_defaults(func=cmd_weights)
    return parser.parse_args(argv)

def main(argv=None):
    args = parse_args(argv)
    try:
        with flags.user_errors(f'evaluate.py {args.command}'):
            args.func(args)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()

if __name__ == '__main__':
    main()

#----------------------------------------------------------------------------
