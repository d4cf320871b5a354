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
them. Every path comes from the user; nothing is downloaded. This file holds sampling, the metrics and the
command line; `plot` and `weights` run read_run.py (reading a run), `export` runs export.py, run checkpoints are
read back by students.py.
"""

import contextlib
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
import sd_unet
from distributed import gather_rows, get_rank, get_world_size, print0
from export import cmd_export
from read_run import cmd_plot, cmd_weights, fid_figure, save_figure
from students import (TEACHER_HINT, Progress, check_file, check_not_inputs, check_output, class_labels, file_key, generator_weights, is_t2i,
                      latents, load_checkpoint, load_generator, load_teacher, output_errors, rank_batches, sd_folder, snapshots_of,
                      write_file, write_json)

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
    write_file(path, lambda f: np.savez(f, **arrays))

# Never unpickles: an .npz holding Python objects is refused, as are random, truncated or misshapen files.
def load_ref(path, need_features=False):
    if not os.path.isfile(path):
        raise FileNotFoundError(f'Reference statistics "{path}" not found: build them with `python evaluate.py ref --data DATASET --dest {path} --detector ...` or pass EDM\'s published .npz')
    fix = f'build it again with `python evaluate.py ref --data DATASET --dest {path} --detector ...` or pass EDM\'s published .npz'
    if not zipfile.is_zipfile(path):
        raise ValueError(f'"{path}" is not an .npz archive (random, truncated or another format): {fix}')
    try:
        with np.load(path, allow_pickle=False) as data:
            ref = {k: data[k] for k in data.keys()}
    except ValueError as err:                               # numpy refuses object arrays when allow_pickle=False
        if 'pickle' not in str(err):
            raise ValueError(f'"{path}" is not a readable .npz ({type(err).__name__}): {fix}') from None
        raise ValueError(f'"{path}" holds pickled Python objects, which are never loaded (they could run code): {fix}') from None
    except Exception as err:                                # zipfile/zlib/numpy report damage in many ways; all mean the same here
        raise ValueError(f'"{path}" is truncated or damaged ({type(err).__name__}): {fix}') from None
    if 'mu' not in ref or 'sigma' not in ref:
        raise ValueError(f'"{path}" is not an EDM reference .npz: it needs arrays "mu" and "sigma", found {sorted(ref)}')
    mu, sigma = ref['mu'], ref['sigma']
    numeric = all(np.issubdtype(a.dtype, np.number) for a in ref.values())
    if not numeric or mu.ndim != 1 or sigma.shape != mu.shape * 2 or 'features' in ref and ref['features'].shape[1:] != mu.shape:
        shapes = ', '.join(f'{k} {list(a.shape)} {a.dtype}' for k, a in ref.items())
        raise ValueError(f'"{path}" holds {shapes}; a reference needs numeric mu [D], sigma [D, D] (and features [N, D]): {fix}')
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f'"{path}": mu or sigma is not finite: {fix}')
    if need_features and 'features' not in ref:
        raise ValueError(f'"{path}" has no "features" array, which precision/recall needs: rebuild it with `python evaluate.py ref` or pass --no-pr')
    return ref

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
    try:
        return torch.jit.load(path, map_location=device).eval()
    except Exception as err:                                # a zip that is not TorchScript (e.g. a torch.save file)
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(f'"{path}" is not a TorchScript archive ({detail}): use NVIDIA\'s inception-2015-12-05.pt; {DETECTOR_HINT} PATH') from None

@torch.no_grad()
def inception_features(detector, images):
    if images.shape[1] == 1:
        images = images.repeat([1, 3, 1, 1])
    return detector(images, return_features=True)

# The detector's feature size, from two blank images of the evaluated shape; a detector without Inception's call
# (uint8 NCHW images, return_features=True -> float [N, D]) is named before any image is made.
def feature_dim(detector, image_shape, device, path='--detector'):
    call = f'detector(uint8 images [N, {max(image_shape[0], 3)}, {image_shape[1]}, {image_shape[2]}], return_features=True)'
    try:
        out = inception_features(detector, torch.zeros([2, *image_shape], dtype=torch.uint8, device=device))
    except Exception as err:
        detail = (str(err).strip().splitlines() or [type(err).__name__])[0][:160]
        raise ValueError(f'Detector "{path}" fails on {call} ({detail}): pass a TorchScript feature detector with Inception\'s call, e.g. NVIDIA\'s inception-2015-12-05.pt') from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or len(out) != 2 or not out.is_floating_point():
        got = f'{list(out.shape)} {out.dtype}' if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f'Detector "{path}" returns {got} for {call}; features must be float [N, D]: pass a detector with Inception\'s call, e.g. NVIDIA\'s inception-2015-12-05.pt')
    return out.shape[-1]

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

# PNG writer for a folder or a .zip (chosen by the name); file names are the seeds, 000042.png. Each PNG, and the
# zip as a whole, is written atomically; a failed write (a full disk) ends in one line and leaves no partial file.
class ImageWriter:
    def __init__(self, path):
        self.path = path
        self.zip = None
        if path.lower().endswith('.zip'):
            with output_errors(path):
                if os.path.dirname(path):
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                self.zip = zipfile.ZipFile(path + '.tmp', 'w', compression=zipfile.ZIP_STORED)
        else:
            with output_errors(os.path.join(path, '.')):
                os.makedirs(path, exist_ok=True)

    def write(self, seed, image):
        buf = io.BytesIO()
        to_pil(image).save(buf, format='png')
        self.add_file(f'{seed:06d}.png', buf.getvalue())

    def add_file(self, name, data):
        if self.zip is None:
            return write_file(os.path.join(self.path, name), lambda f: f.write(data))
        with self.or_abort():
            self.zip.writestr(name, data)

    def close(self):
        if self.zip is not None:
            with self.or_abort():
                self.zip.close()
                os.replace(self.path + '.tmp', self.path)

    @contextlib.contextmanager
    def or_abort(self):             # a failed zip write is one line, and the partial zip goes
        try:
            with output_errors(self.path):
                yield
        except BaseException:
            self.abort()
            raise

    def abort(self):
        if self.zip is not None:
            try:
                self.zip.close()
            except Exception:
                pass
            if os.path.exists(self.path + '.tmp'):
                os.remove(self.path + '.tmp')

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

#----------------------------------------------------------------------------
# EDM. A run's checkpoint rebuilds the student as edm_nets.EDMPrecond(**generator_kwargs) (the EMA weights if
# the run kept them) wrapped in the one-step generator G(z) = D(sigma_init z; sigma_init); the teacher comes
# from an official EDM pickle and samples with EDM's Heun sampler (Karras et al. Alg. 2).

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
    generator.load_state_dict(ckpt[generator_weights(ckpt)])
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
# Command line. Every input is checked before any network runs; errors are one line.

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

# The files and folders a command reads, which none of its outputs may be: [(flag, path)].
def source_inputs(args, ckpt=None):
    inputs = [('--ckpt', getattr(args, 'ckpt', None)), ('the checkpoint', ckpt['path'] if ckpt is not None else None)]
    return inputs + [(f'--{k}', getattr(args, k, None)) for k in ('teacher', 'sd', 'captions', 'images', 'ref', 'detector', 'clip_model')]

def cmd_generate(args):
    ckpt, prompts = check_source(args)
    to_zip = args.outdir.lower().endswith('.zip')
    check_output('--outdir', args.outdir, kind='file' if to_zip else 'dir')
    captions = [os.path.join(args.outdir, 'captions.txt')] if prompts is not None and not to_zip else []
    check_not_inputs('--outdir', [args.outdir, *captions], source_inputs(args, ckpt))
    seeds = parse_seeds(args.seeds)
    device = init_distributed()
    sampler = load_source(args, ckpt, prompts, device)
    writer = ImageWriter(args.outdir) if get_rank() == 0 or not to_zip else None
    for batch_seeds, images in generate(sampler, seeds, args.batch, device):
        if to_zip:                                          # one zip: rank 0 writes every rank's images
            batch_seeds = gather_rows(torch.as_tensor(batch_seeds, dtype=torch.int64, device=device)).tolist()
            images = gather_rows(images)
        if writer is not None:
            for seed, image in zip(batch_seeds, images):
                writer.write(seed, image)
    if prompts is not None and get_rank() == 0:             # line i: the prompt of image i in file order
        writer.add_file('captions.txt', ''.join(p + '\n' for p in sampler.condition(sorted(set(seeds)), device)).encode('utf-8'))
    if writer is not None:
        writer.close()
    print0(f'Wrote {len(seeds)} images to "{args.outdir}"' + (' with captions.txt' if prompts is not None else ''))

def cmd_ref(args):
    check_detector(args.detector)
    check_output('--dest', args.dest)
    check_not_inputs('--dest', [args.dest], [('--data', args.data), ('--detector', args.detector)])
    num = len(dataset.ImageDataset(args.data))
    if num < 2:
        raise ValueError(f'"{args.data}" holds {num} image; statistics need at least 2')
    device = init_distributed()
    detector = load_detector(args.detector, device)
    feature_dim(detector, image_shape(args.data), device, args.detector)
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
    else:
        check_output('--report', args.report)
        check_not_inputs('--report', [args.report], source_inputs(args, ckpt))
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
    if args.snapshots:                                      # the reference's statistics only if a snapshot needs scoring
        return fid_of_snapshots(args, snapshots, prompts, seed_sets[0], detector, lambda: ref or reference_stats(args, detector, device, pr), device)
    if ref is None:
        ref = reference_stats(args, detector, device, pr)
    real_features = torch.as_tensor(ref['features'], device=device) if pr else None
    sampler = load_source(args, ckpt, prompts, device) if args.images is None else None
    dim = feature_dim(detector, sampler.image_shape if sampler is not None else image_shape(args.images), device, args.detector)
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

def reference_stats(args, detector, device, pr):
    feature_dim(detector, image_shape(args.ref), device, args.detector)
    stats = stats_of_images(args.ref, detector, args.batch, device, keep_features=pr)
    mu, sigma = stats.mu_sigma()
    return dict(mu=mu, sigma=sigma, features=stats.all_features() if pr else None)

# Model selection: FID of every generator snapshot of a run (training_loop writes snapshot-<iteration>.pt every
# --snap-every, from iteration 0), all on the same seeds, so the curve shows the run and not the seeds. Results go
# to <run>/fid-snapshots.json and .png after each snapshot. Each snapshot is scored with the weights a warm start
# from it uses: its EMA when it kept one, else its raw generator; "weights" in the JSON says which
# ('generator_ema' or 'generator'). A rerun reuses an entry only when everything that made its number is the same:
# the seeds, the detector and reference files, the sampler settings (the cache's "key"), and the snapshot file.
# Files are identified by path, size and modification time in ns, not by a content hash: hashing a 2 GB snapshot
# or a 400 MB reference on every rerun costs seconds each, while every rewrite (ours replace files atomically)
# changes the time.
FID_CACHE_SCHEMA = 2

def check_snapshots(args, seed_sets):
    if args.images is not None or args.teacher is not None or not os.path.isdir(args.ckpt or ''):
        raise ValueError(f'--snapshots scores the snapshots of a run: pass --ckpt RUN_DIR (got --ckpt {args.ckpt})')
    if len(seed_sets) != 1:
        raise ValueError('--snapshots takes one seed set per snapshot: drop --repeats, or pass one range to --seeds')
    snapshots = snapshots_of(args.ckpt)
    if not snapshots:
        raise FileNotFoundError(f'No snapshot-<iteration>.pt in "{args.ckpt}": training_loop.py writes them every --snap-every iterations')
    outputs = [os.path.join(args.ckpt, name) for name in ('fid-snapshots.json', 'fid-snapshots.png')]
    for path in outputs:
        check_output('--snapshots', path)
    check_not_inputs('--snapshots', outputs, source_inputs(args) + [('a snapshot', path) for path in snapshots])
    return snapshots

def cache_key(args, seeds):
    sampler = dict(resolution=args.resolution, bf16=args.bf16, sd=file_key(args.sd), captions=file_key(args.captions)) if args.captions or args.sd else {}
    return dict(seeds=f'{seeds[0]}-{seeds[-1]}', num_images=len(seeds), detector=file_key(args.detector), ref=file_key(args.ref), sampler=sampler)

# The entries of a readable cache made with `key`, by snapshot file name; a damaged or foreign cache is named and rebuilt.
def read_fid_cache(path, key):
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding='utf-8') as f:
            old = json.load(f)
        if not isinstance(old, dict) or old.get('schema') != FID_CACHE_SCHEMA:
            raise ValueError(f'schema {old.get("schema") if isinstance(old, dict) else type(old).__name__}, not {FID_CACHE_SCHEMA}')
        entries = {}
        for e in old['snapshots']:
            if not (type(e['fid']) is float and type(e['iteration']) is int and e['weights'] in ('generator', 'generator_ema') and isinstance(e['file'], str)):
                raise ValueError(f'a malformed entry {" ".join(str(e).split())[:60]}')
            entries[e['file']] = e
    except (OSError, ValueError, KeyError, TypeError) as err:
        print0(f'{path} cannot be read ({type(err).__name__}: {" ".join(str(err).split())[:120]}); rebuilding it')
        return {}
    if old.get('key') != key:
        changed = sorted(k for k in key if key[k] != (old.get('key') or {}).get(k))
        print0(f'{path} was made with other {", ".join(changed)}: scoring every snapshot again')
        return {}
    return entries

def fid_of_snapshots(args, snapshots, prompts, seeds, detector, reference, device):
    path_json, path_png = os.path.join(args.ckpt, 'fid-snapshots.json'), os.path.join(args.ckpt, 'fid-snapshots.png')
    key = cache_key(args, seeds)
    done, entries, ref = read_fid_cache(path_json, key), [], None
    for i, path in enumerate(snapshots):
        name, stat = os.path.basename(path), file_key(path)
        entry = done.get(name)
        if entry is None or (entry.get('size'), entry.get('mtime_ns')) != (stat['size'], stat['mtime_ns']):
            ckpt = load_checkpoint(path)
            ref = ref or reference()
            sampler = load_source(args, ckpt, prompts, device)
            dim = feature_dim(detector, sampler.image_shape, device, args.detector)
            if dim != len(ref['mu']):
                raise ValueError(f'--ref "{args.ref}" holds {len(ref["mu"])}-d features but --detector "{args.detector}" gives {dim}-d ones: build the reference with the same detector')
            stats = stats_of_seeds(sampler, seeds, detector, args.batch, device, keep_features=False,
                                   label=f'[snapshot {i + 1}/{len(snapshots)}: iteration {ckpt["iteration"]}] ')
            mu, sigma = stats.mu_sigma()
            weights = generator_weights(ckpt)
            entry = dict(iteration=int(ckpt['iteration']), path=path, file=name, size=stat['size'], mtime_ns=stat['mtime_ns'],
                         weights=weights, fid=frechet_distance(mu, sigma, ref['mu'], ref['sigma']), num_images=len(seeds))
        entries.append(dict(entry, path=path))
        best = min(entries, key=lambda e: e['fid'])
        print0(f'iteration {entry["iteration"]}  FID {entry["fid"]:.4f}  ({entry["num_images"]} images, {entry["weights"]} weights)')
        if get_rank() == 0:
            write_json(path_json, dict(schema=FID_CACHE_SCHEMA, key=key, snapshots=entries, ref=args.ref,
                                       best=dict(iteration=best['iteration'], path=best['path'], fid=best['fid'], weights=best['weights'])))
            save_figure(fid_figure(entries, best), path_png)
    print0(f'Best: iteration {best["iteration"]}, FID {best["fid"]:.4f}, {best["weights"]} weights ({best["path"]}); wrote "{path_json}" and "{path_png}"')

# CLIP score of a folder/zip of images with their captions, or of a text-to-image source's images made on the fly.
def check_report(args, ckpt=None):
    if args.report:
        check_output('--report', args.report)
        check_not_inputs('--report', [args.report], source_inputs(args, ckpt))

def cmd_clip(args):
    check_clip_model(args.clip_model)
    check_report(args)
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
    check_report(args, ckpt)
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
    p.add_argument('--dest', required=True, help='Output folder, new or empty (created): config.json + diffusion_pytorch_model.safetensors, or generator.safetensors + generator.json; and README.md')
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
