"""train_t2i.py end to end on CPU: a tiny diffusers-format SD folder written here, synthetic image-caption
pairs, a 2-process gloo torchrun, resume, decoded sample grids with their prompts."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch

from fixtures import free_port, load_checkpoint as load
import sd_unet
import train_t2i
import flags
from test_sd_unet import write_tiny_sd_folder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTIONS = ['a cat', 'a dog', 'cat and dog', 'a red cat', 'a dog on grass', 'two cats', 'a big dog', 'the cat sleeps']

@pytest.fixture(scope='module')
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp('t2i')
    write_tiny_sd_folder(str(d / 'sd'))
    rnd = np.random.RandomState(0)
    os.makedirs(d / 'images')
    with open(d / 'pairs.jsonl', 'w') as f:
        for i, caption in enumerate(CAPTIONS):
            PIL.Image.fromarray(rnd.randint(0, 256, (20, 24, 3), dtype=np.uint8)).save(d / 'images' / f'{i}.png')
            f.write(json.dumps(dict(image=f'images/{i}.png', caption=caption)) + '\n')
    return d

def train(files, outdir, *args, nproc=2, check=True):
    cmd = [sys.executable, '-m', 'torch.distributed.run', f'--nproc_per_node={nproc}', f'--master_port={free_port()}'] if nproc > 1 else [sys.executable]
    cmd += ['train_t2i.py', '--sd', str(files / 'sd'), '--data', str(files / 'pairs.jsonl'), '--outdir', str(outdir),
            '--resolution', '16', '--disc-res', '4', '--batch', '4', '--tau', '3', '--grid', '4', '--log-every', '1',
            '--ckpt-every', '1', '--keep', '100', '--snap-every', '3', '--encode-batch', '2', *args]
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HUB_OFFLINE='1')
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f'{" ".join(cmd)} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}')
    return result

def test_two_processes_run_resume_and_write_grids(files, tmp_path):
    straight, resumed = tmp_path / 'straight', tmp_path / 'resumed'
    train(files, straight, '--iterations', '4', '--grad-ckpt')
    out = set(os.listdir(straight))
    assert {'latents-16.npy', 'stats.jsonl', 'grid-0000000.png', 'grid-0000003.png', 'grid-0000003.txt', 'checkpoint-0000004.pt'} <= out
    grid = PIL.Image.open(straight / 'grid-0000003.png')
    assert grid.size == (32, 32) and grid.mode == 'RGB'             # 4 decoded 16x16 images, 2 x 2
    assert open(straight / 'grid-0000003.txt').read().splitlines() == [CAPTIONS[i] for i in (0, 2, 4, 7)]
    stats = [json.loads(line) for line in open(straight / 'stats.jsonl')]
    assert 'loss_fdistill' in stats[0] and 'loss_r1' in stats[1] and stats[1]['loss_r1'] > 0
    assert all(np.isfinite(v) for s in stats for v in s.values())
    latents = np.load(straight / 'latents-16.npy')
    assert latents.shape == (8, 4, 8, 8) and np.abs(latents).sum() > 0
    # Resume: 2 iterations, then on to 4, equals the straight run (the latents cache is reused).
    train(files, resumed, '--iterations', '2', '--grad-ckpt')
    train(files, resumed, '--iterations', '4', '--grad-ckpt', '--resume')
    a, b = load(straight, 4), load(resumed, 4)
    for key in ('generator', 'fake_score', 'head'):
        for k in a[key]:
            torch.testing.assert_close(a[key][k], b[key][k], atol=0, rtol=0)
    assert a['cfg'] == 1.75 and a['head_kwargs']['resolutions'] == [4]

def test_bad_inputs_fail_with_one_line(files, tmp_path):
    cases = [(['--sd', str(tmp_path / 'nosd')], 'unet/config.json not found'),
             (['--data', str(tmp_path / 'none.jsonl')], '--data not found'),
             (['--disc-res', '8'], 'the discriminator reads the mid block, 4x4')]
    for args, expect in cases:
        result = train(files, tmp_path / 'run', '--iterations', '1', *args, nproc=1, check=False)
        assert result.returncode != 0 and expect in result.stderr.strip().splitlines()[-1], result.stderr[-500:]

# SD's preset trains with gradient checkpointing (128 per GPU does not fit 80 GB without it); --no-grad-ckpt turns it off.
def test_gradient_checkpointing_is_on_by_default():
    parse = lambda *argv: flags.parse_args(train_t2i.__doc__, train_t2i.PRESET, train_t2i.add_t2i_args, list(argv))
    assert parse().grad_ckpt is True and parse('--grad-ckpt').grad_ckpt is True and parse('--no-grad-ckpt').grad_ckpt is False

# The text encoder runs every round: in bf16 matmuls under --precision bf16, and exactly as before in fp32.
def test_text_context_follows_precision(files):
    sd = sd_unet.load_sd(str(files / 'sd'))
    dtypes = []
    hooks = [m.register_forward_hook(lambda m, args, out: dtypes.append(out.dtype)) for m in sd['text_encoder'].modules() if isinstance(m, torch.nn.Linear)]
    bf16 = train_t2i.text_context(sd, CAPTIONS[:2], torch.device('cpu'), 'bf16')
    assert dtypes and set(dtypes) == {torch.bfloat16}
    dtypes.clear()
    fp32 = train_t2i.text_context(sd, CAPTIONS[:2], torch.device('cpu'), 'fp32')
    assert set(dtypes) == {torch.float32}
    assert torch.equal(fp32, sd_unet.encode_prompts(sd['tokenizer'], sd['text_encoder'], CAPTIONS[:2]))
    # bf16 rounds to 2^-8 relative; the tiny CLIP rounds ~16 times in a row (embeddings, 2 layers x 6 matmuls, norm).
    torch.testing.assert_close(bf16.float(), fp32, atol=16 * 2 ** -8 * fp32.abs().max().item(), rtol=0)
    for h in hooks:
        h.remove()
