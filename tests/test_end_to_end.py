"""A user's first run, end to end with the presets' defaults: a small EDM teacher trained here on structured 8x8
images and written as an official pickle, `train_cifar.py` with only the flags a tiny dataset needs, then
`evaluate.py fid` and `generate` with a small TorchScript detector."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

import fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = 4

# 8x8 RGB shapes on a black ground, one shape per class: a horizontal bar, a vertical bar, a 3x3 square and a
# diagonal, each at a random place and in a random primary or secondary colour (uint8 NHWC, labels).
def shapes(num, seed):
    rng = np.random.default_rng(seed)
    colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 0], [0, 255, 255], [255, 0, 255]], dtype=np.uint8)
    images, labels = np.zeros([num, 8, 8, 3], dtype=np.uint8), np.arange(num) % CLASSES
    for image, label in zip(images, labels):
        mask = np.zeros([8, 8], dtype=bool)
        a, b = rng.integers(0, 7), rng.integers(0, 6)
        if label == 0:
            mask[a:a + 2, :] = True
        elif label == 1:
            mask[:, a:a + 2] = True
        elif label == 2:
            mask[b:b + 3, a // 2 * 2 % 6:a // 2 * 2 % 6 + 3] = True
        else:
            mask[np.arange(8), (np.arange(8) + a) % 8] = True
        image[mask] = colours[rng.integers(0, len(colours))]
    return images, labels

# EDM's denoiser loss (Karras et al. 2022, Table 1: ln sigma ~ N(-1.2, 1.2^2), weight (s^2 + sd^2) / (s sd)^2).
def train_teacher(images, labels, steps, batch=32):
    torch.manual_seed(0)
    net = fixtures.tiny_songunet(label_dim=CLASSES, resolution=8).train()
    x = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 127.5 - 1
    onehot = torch.eye(CLASSES)[torch.as_tensor(labels)]
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    for step in range(steps):
        i = torch.randint(0, len(x), [batch])
        sigma = (torch.randn([batch, 1, 1, 1]) * 1.2 - 1.2).exp()
        weight = (sigma ** 2 + 0.25) / (sigma * 0.5) ** 2
        y = x[i]
        loss = (weight * (net(y + torch.randn_like(y) * sigma, sigma, onehot[i]) - y) ** 2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return net.eval()

# The detector: fixed random features of the 4x4 average-pooled image, with the Inception call signature.
class Detector(torch.nn.Module):
    def __init__(self, dim=16):
        super().__init__()
        self.proj = torch.nn.Linear(48, dim)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        features = torch.tanh(self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float() / 127.5 - 1, 4).flatten(1)))
        return features if return_features else features.softmax(1)

def script(name, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run([sys.executable, name, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if result.returncode != 0:
        raise AssertionError(f'{name} {" ".join(map(str, args))} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
    return result

def features(detector, images):
    return detector(torch.as_tensor(images).permute(0, 3, 1, 2).contiguous(), return_features=True).double().numpy()

def read_pngs(folder):
    return np.stack([np.array(PIL.Image.open(os.path.join(d, f))) for d, _, files in sorted(os.walk(folder)) for f in sorted(files) if f.endswith('.png')])

# Frechet distance by the eigenvalues of S1 S2 (a product of PSD matrices: real, >= 0), not evaluate.py's sqrtm.
def frechet(a, b):
    s1, s2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = np.sqrt(np.clip(np.linalg.eigvals(s1 @ s2).real, 0, None)).sum()
    return float(np.square(a.mean(0) - b.mean(0)).sum() + np.trace(s1) + np.trace(s2) - 2 * root), np.trace(s1) + np.trace(s2)

def test_presets_defaults_learn_and_evaluate_end_to_end(tmp_path):
    import evaluate
    torch.set_num_threads(1)                        # the tiny teacher's steps are faster on one thread than on two
    images, labels = shapes(512, seed=0)
    fixtures.write_zip(tmp_path / 'data.zip', images, labels)
    fixtures.write_edm_pickle(tmp_path / 'teacher.pkl', dict(ema=train_teacher(images, labels, steps=500)))
    torch.jit.script(Detector()).save(str(tmp_path / 'detector.pt'))
    run = tmp_path / 'run'
    # Only what a tiny dataset needs; everything else (lr, tau, w_gan, R1, clip, EMA and its ramp-up) is the preset's.
    script('train_cifar.py', '--teacher', tmp_path / 'teacher.pkl', '--data', tmp_path / 'data.zip', '--outdir', run,
           '--batch', 32, '--iterations', 300, '--disc-res', '8,4')
    # The reference is the teacher's own samples (EDM's 18-step Heun): distillation's target.
    script('evaluate.py', 'generate', '--teacher', tmp_path / 'teacher.pkl', '--outdir', tmp_path / 'teacher_images', '--seeds', '1000-1511')
    common = ['--ref', tmp_path / 'teacher_images', '--detector', tmp_path / 'detector.pt', '--num-images', 512, '--no-pr']
    script('evaluate.py', 'fid', '--ckpt', run, '--snapshots', *common)
    script('evaluate.py', 'fid', '--ckpt', run, *common, '--report', tmp_path / 'metrics.json')
    script('evaluate.py', 'generate', '--ckpt', run, '--outdir', tmp_path / 'images', '--seeds', '0-511')

    # The evaluated (EMA) generator moves decisively toward the teacher. Without the ramp-up the preset's half-life
    # (500 kimg) against the 9.6 kimg this run sees moves the EMA 1 - 0.5 ** (9.6 / 500) = 1.3% of the way, and its
    # FD stays within a percent of iteration 0's (measured: 0.9986 of it at 300 iterations, 0.998 at 400); with it, the
    # FD fell to 0.53 (300) and 0.65 (400) of iteration 0's on this machine, so the bar is 3/4.
    snapshots = json.load(open(run / 'fid-snapshots.json'))['snapshots']
    assert [s['iteration'] for s in snapshots] == [0, 300]
    assert snapshots[1]['fid'] <= 0.75 * snapshots[0]['fid'], snapshots

    # evaluate.py's FID of the run is the FD of the images `generate` writes (same seeds, same EMA weights), here
    # from the PNGs with the detector and our own FD. The features are float32 (relative error ~1e-7, batching
    # differs) summed in float64; FD cancels the trace terms, so its error is ~1e-7 of those: 1e-5 is a wide margin.
    detector = torch.jit.load(str(tmp_path / 'detector.pt'))
    with torch.no_grad():
        expect, traces = frechet(features(detector, read_pngs(tmp_path / 'images')), features(detector, read_pngs(tmp_path / 'teacher_images')))
    fid = json.load(open(tmp_path / 'metrics.json'))['sets'][0]['fid']
    assert fid == pytest.approx(expect, abs=1e-5 * traces) and snapshots[1]['fid'] == pytest.approx(expect, abs=1e-5 * traces)

    # The EMA tracks the raw generator: its outputs lie closer to the raw generator's than the start's do (EDM's
    # ramp-up keeps its half-life at 5% of the images seen; without it the EMA stays ~99% of the way back at the start).
    start, end = (evaluate.load_checkpoint(str(run / f'snapshot-{it:07d}.pt')) for it in (0, 300))
    z = torch.randn([64, 3, 8, 8])
    labels = torch.eye(CLASSES)[torch.arange(64) % CLASSES]
    with torch.no_grad():
        raw0, raw, ema = (evaluate.load_generator(dict(c, generator_ema=None) if raw else c, 'cpu')(z, labels)
                          for c, raw in ((start, True), (end, True), (end, False)))
    assert (ema - raw).norm() < 0.5 * (raw0 - raw).norm()
