import copy
import json
import os
import re
import zipfile

import numpy as np
import PIL.Image
import pytest
import torch

import edm_nets
import edm_pickle
import evaluate
import fdistill
import fixtures
import rundir

#----------------------------------------------------------------------------
# Frechet distance against independent truths.

def random_spd(rng, n):
    a = rng.standard_normal([n, n])
    return a @ a.T / n + 0.1 * np.eye(n)

def test_frechet_distance_diagonal_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.standard_normal(16), rng.standard_normal(16)
    a, b = rng.uniform(0.1, 3, 16), rng.uniform(0.1, 3, 16)
    # For diagonal covariances, tr(A + B - 2 (AB)^(1/2)) = sum (sqrt(a) - sqrt(b))^2.
    expected = np.square(mu1 - mu2).sum() + np.square(np.sqrt(a) - np.sqrt(b)).sum()
    assert evaluate.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)

def test_frechet_distance_identical_and_symmetric():
    rng = np.random.default_rng(1)
    mu, s1, s2 = rng.standard_normal(32), random_spd(rng, 32), random_spd(rng, 32)
    assert abs(evaluate.frechet_distance(mu, s1, mu, s1)) < 1e-9
    d12 = evaluate.frechet_distance(mu, s1, mu + 1, s2)
    d21 = evaluate.frechet_distance(mu + 1, s2, mu, s1)
    assert d12 > 32 and d12 == pytest.approx(d21, rel=1e-9)

def test_frechet_distance_matches_eigendecomposition():
    # The Bures form: tr(S1) + tr(S2) - 2 tr((S1^1/2 S2 S1^1/2)^1/2), every root from a symmetric eigh.
    def sym_sqrt(s):
        w, v = np.linalg.eigh(s)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    rng = np.random.default_rng(2)
    for n in (3, 50):
        mu1, mu2 = rng.standard_normal(n), rng.standard_normal(n)
        s1, s2 = random_spd(rng, n), random_spd(rng, n)
        r1 = sym_sqrt(s1)
        expected = np.square(mu1 - mu2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(sym_sqrt(r1 @ s2 @ r1))
        assert evaluate.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)

def test_feature_stats_float64_unbiased():
    x = torch.randn(100, 8, dtype=torch.float64) * 3 + 5
    stats = evaluate.FeatureStats(dim=8)
    for chunk in x.split(7):
        stats.append(chunk.float())
    mu, sigma = stats.mu_sigma()
    ref = x.float().double().numpy()
    np.testing.assert_allclose(mu, ref.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(ref, rowvar=False, ddof=1), rtol=1e-9, atol=1e-12)

def test_ref_npz_round_trip_in_edm_format(tmp_path):
    rng = np.random.default_rng(3)
    mu, sigma, feats = rng.standard_normal(2048), random_spd(rng, 2048), rng.standard_normal([5, 2048])
    path = str(tmp_path / 'refs' / 'x.npz')
    evaluate.save_ref(path, mu, sigma, feats)
    raw = dict(np.load(path))                                   # what EDM's fid.py does with the file
    assert raw['mu'].dtype == np.float64 and raw['sigma'].shape == (2048, 2048)
    np.testing.assert_array_equal(raw['mu'], mu)
    np.testing.assert_array_equal(raw['sigma'], sigma)
    ref = evaluate.load_ref(path, need_features=True)
    np.testing.assert_array_equal(ref['features'], feats.astype(np.float32))
    evaluate.save_ref(path, mu, sigma)
    with pytest.raises(ValueError, match='features'):
        evaluate.load_ref(path, need_features=True)
    with pytest.raises(FileNotFoundError, match='evaluate.py ref'):
        evaluate.load_ref(str(tmp_path / 'missing.npz'))

#----------------------------------------------------------------------------
# Precision and recall on point sets with known answers.

def test_precision_recall_identical_and_far_apart():
    x = torch.randn(60, 16)
    assert evaluate.precision_recall(x, x.clone()) == (1.0, 1.0)
    assert evaluate.precision_recall(x, x + 1000) == (0.0, 0.0)

def test_precision_recall_by_hand():
    # 1-D points, k = 1. Real {0, 1, 10, 11}: every real ball has radius 1. Fake {0.4, 1.2, 5, 5.5}: radii
    # 0.8, 0.8, 0.5, 0.5. Fake 0.4 and 1.2 lie in real balls, 5 and 5.5 do not: precision 1/2.
    # Real 0 and 1 lie in fake balls (0.4 and 0.2 away), 10 and 11 do not: recall 1/2.
    real = torch.tensor([[0.0], [1.0], [10.0], [11.0]])
    fake = torch.tensor([[0.4], [1.2], [5.0], [5.5]])
    assert evaluate.precision_recall(real, fake, k=1) == (0.5, 0.5)

def test_precision_recall_dropped_mode():
    # The generator reproduces one of two well-separated real clusters exactly (a subset of the real
    # points): everything it makes is realistic (precision 1), but half the real data is missed (recall 1/2).
    real = torch.cat([torch.randn(30, 8), torch.randn(30, 8) + 100])
    fake = real[:30].clone()
    assert evaluate.precision_recall(real, fake, k=3) == (1.0, 0.5)

def test_precision_recall_chunked_matches_adm_convention(monkeypatch):
    # ADM's evaluator: squared distances, radius = k-th smallest distance with the point itself at index 0,
    # membership with <=. Computed here in float64 numpy on the full matrices; evaluate.py in small chunks.
    def brute(real, fake, k):
        d = lambda a, b: np.square(a[:, None] - b[None]).sum(-1)
        r_real, r_fake = np.sort(d(real, real), 1)[:, k], np.sort(d(fake, fake), 1)[:, k]
        return (d(fake, real) <= r_real[None]).any(1).mean(), (d(real, fake) <= r_fake[None]).any(1).mean()
    rng = np.random.default_rng(4)
    real = rng.standard_normal([90, 5])
    fake = rng.standard_normal([70, 5]) * 1.3 + 0.4
    monkeypatch.setattr(evaluate, 'CHUNK_ELEMENTS', 1000)       # about 10 rows per chunk
    p, r = evaluate.precision_recall(torch.tensor(real), torch.tensor(fake), k=3)
    p_ref, r_ref = brute(real, fake, 3)
    assert 0 < p < 1 and 0 < r < 1
    assert (p, r) == (pytest.approx(p_ref), pytest.approx(r_ref))

def test_precision_recall_needs_more_than_k():
    with pytest.raises(ValueError, match='more than 3'):
        evaluate.precision_recall(torch.randn(3, 4), torch.randn(10, 4))

#----------------------------------------------------------------------------
# The detector path: a TorchScript module with the Inception call signature, saved and loaded for real.

class TinyDetector(torch.nn.Module):
    def __init__(self, dim=2048):
        super().__init__()
        self.proj = torch.nn.Linear(48, dim)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        assert x.dtype == torch.uint8 and x.shape[1] == 3
        features = torch.tanh(self.proj(torch.nn.functional.adaptive_avg_pool2d(x.float() / 255, 4).flatten(1)))
        return features if return_features else features.softmax(1)

def write_pngs(folder, n, seed=0, size=16):
    rng = np.random.default_rng(seed)
    os.makedirs(folder, exist_ok=True)
    images = rng.integers(0, 256, [n, size, size, 3], dtype=np.uint8)
    for i, image in enumerate(images):
        PIL.Image.fromarray(image).save(os.path.join(folder, f'{i:06d}.png'))
    return images

def test_detector_statistics_and_ref_command(tmp_path):
    module = TinyDetector().eval()
    path = str(tmp_path / 'inception-2015-12-05.pt')
    torch.jit.script(module).save(path)
    images = write_pngs(str(tmp_path / 'data'), 10)
    evaluate.main(['ref', '--data', str(tmp_path / 'data'), '--dest', str(tmp_path / 'ref.npz'), '--detector', path, '--batch', '4'])
    ref = evaluate.load_ref(str(tmp_path / 'ref.npz'), need_features=True)
    with torch.no_grad():
        expected = module(torch.from_numpy(images).permute(0, 3, 1, 2), return_features=True).double().numpy()
    np.testing.assert_allclose(ref['features'], expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref['mu'], expected.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ref['sigma'], np.cov(expected, rowvar=False), rtol=1e-4, atol=1e-7)

def test_fid_command_on_its_own_reference(tmp_path):
    # The same folder as "generated" images against its own reference: FID 0, precision = recall = 1.
    # A 32-d detector here: scipy's sqrtm of a 2048 x 2048 matrix alone takes minutes on 2 CPU cores.
    path = str(tmp_path / 'detector.pt')
    torch.jit.script(TinyDetector(32)).save(path)
    write_pngs(str(tmp_path / 'data'), 12)
    evaluate.main(['ref', '--data', str(tmp_path / 'data'), '--dest', str(tmp_path / 'ref.npz'), '--detector', path])
    report = str(tmp_path / 'metrics.json')
    evaluate.main(['fid', '--images', str(tmp_path / 'data'), '--num-images', '12', '--ref', str(tmp_path / 'ref.npz'), '--detector', path, '--report', report])
    result = json.load(open(report))['sets'][0]
    assert result['num'] == 12 and abs(result['fid']) < 1e-6 and result['precision'] == 1.0 and result['recall'] == 1.0
    # Half the folder against the whole: the FID is that of the two sets' own statistics.
    evaluate.main(['fid', '--images', str(tmp_path / 'data'), '--num-images', '6', '--seed', '1', '--ref', str(tmp_path / 'ref.npz'), '--detector', path, '--report', report, '--no-pr'])
    result = json.load(open(report))['sets'][0]
    ref = evaluate.load_ref(str(tmp_path / 'ref.npz'), need_features=True)
    chosen = ref['features'][evaluate.select_images(str(tmp_path / 'data'), 6, seed=1)].astype(np.float64)
    expected = evaluate.frechet_distance(chosen.mean(0), np.cov(chosen, rowvar=False), ref['mu'], ref['sigma'])
    assert result['fid'] == pytest.approx(expected, rel=1e-4) and result['fid'] > 0.01
    # The feature size comes from the detector: a 16-d one against this 32-d reference is one clear error.
    torch.jit.script(TinyDetector(16)).save(str(tmp_path / 'other.pt'))
    with pytest.raises(SystemExit, match='holds 32-d features but --detector ".*other.pt" gives 16-d ones: build the reference with the same detector'):
        evaluate.main(['fid', '--images', str(tmp_path / 'data'), '--num-images', '12', '--ref', str(tmp_path / 'ref.npz'), '--detector', str(tmp_path / 'other.pt')])

def test_missing_inputs_fail_with_one_line(tmp_path):
    with pytest.raises(SystemExit, match='download it yourself'):
        evaluate.main(['fid', '--images', str(tmp_path), '--ref', 'x.npz', '--detector', str(tmp_path / 'nope.pt')])
    pkl = tmp_path / 'inception-2015-12-05.pkl'
    pkl.write_bytes(b'\x80\x04not a torchscript archive')
    with pytest.raises(SystemExit, match='not a TorchScript archive'):
        evaluate.main(['ref', '--data', str(tmp_path), '--dest', 'x.npz', '--detector', str(pkl)])
    torch.jit.script(TinyDetector()).save(str(tmp_path / 'd.pt'))
    write_pngs(str(tmp_path / 'few'), 3)
    write_pngs(str(tmp_path / 'data'), 10)
    with pytest.raises(SystemExit, match='--num-images asks for 50000'):
        evaluate.main(['fid', '--images', str(tmp_path / 'data'), '--ref', str(tmp_path / 'few'), '--detector', str(tmp_path / 'd.pt')])
    with pytest.raises(SystemExit, match='needs at least 4'):
        evaluate.main(['fid', '--images', str(tmp_path / 'data'), '--num-images', '10', '--ref', str(tmp_path / 'few'), '--detector', str(tmp_path / 'd.pt')])
    with pytest.raises(SystemExit, match='No run checkpoint'):
        evaluate.main(['fid', '--ckpt', str(tmp_path), '--ref', str(tmp_path / 'few'), '--detector', str(tmp_path / 'd.pt')])

def test_seed_parsing():
    assert evaluate.parse_seeds('0-3,10') == [0, 1, 2, 3, 10]
    assert evaluate.parse_seed_sets('0-2,5-6') == [[0, 1, 2], [5, 6]]
    with pytest.raises(ValueError):
        evaluate.parse_seeds('5-2')

#----------------------------------------------------------------------------
# Sampling from a run checkpoint (the contract of training_loop.py) and from an official-format teacher.

def randomized(net, scale=0.1):
    with torch.no_grad():
        for p in net.parameters():
            p.add_(torch.randn_like(p) * scale)
    return net.eval()

def tiny_net():
    return edm_nets.EDMPrecond(img_resolution=16, img_channels=3, label_dim=4, model_type='SongUNet', model_channels=16,
                               channel_mult=[1, 2], num_blocks=1, attn_resolutions=[8], dropout=0.1)

def write_run(tmp_path, f='fkl', num_bins=4):
    teacher = randomized(tiny_net())
    teacher_path = str(tmp_path / 'teacher.pkl')
    fixtures.write_edm_pickle(teacher_path, dict(ema=teacher))
    generator, fake_score = randomized(copy.deepcopy(teacher)), randomized(copy.deepcopy(teacher))
    head_kwargs = dict(channels=edm_nets.feature_channels(teacher, [8]), resolutions=[8])
    head = randomized(fdistill.DiscriminatorHead(**head_kwargs), 0.3)
    os.makedirs(tmp_path / 'run', exist_ok=True)
    torch.save(dict(iteration=10, generator_kwargs=teacher.init_kwargs, sigma_init=80.0, generator=generator.state_dict(),
                    generator_ema=None, fake_score=fake_score.state_dict(), head=head.state_dict(), head_kwargs=head_kwargs,
                    options=dict(f=f, r_min=0.01, r_max=100.0, num_bins=num_bins, disc_res=[8], teacher=teacher_path)),
               str(tmp_path / 'run' / 'checkpoint-0000010.pt'))
    return dict(teacher=teacher, generator=generator, fake_score=fake_score, head=head, run=str(tmp_path / 'run'), teacher_path=teacher_path)

def read_png(path_or_zip, seed):
    if str(path_or_zip).endswith('.zip'):
        with zipfile.ZipFile(path_or_zip) as z:
            return np.array(PIL.Image.open(z.open(f'{seed:06d}.png')))
    return np.array(PIL.Image.open(os.path.join(path_or_zip, f'{seed:06d}.png')))

def test_one_step_image_regenerates_alone(tmp_path):
    nets = write_run(tmp_path)
    evaluate.main(['generate', '--ckpt', nets['run'], '--outdir', str(tmp_path / 'batch.zip'), '--seeds', '0-5', '--batch', '6'])
    evaluate.main(['generate', '--ckpt', nets['run'], '--outdir', str(tmp_path / 'alone'), '--seeds', '3', '--batch', '1'])
    assert np.array_equal(read_png(tmp_path / 'batch.zip', 3), read_png(tmp_path / 'alone', 3))
    # Independently: seed 3's latent is N(0, I) from a generator seeded 3, its class is 3 % 4, G(z) = D(80 z; 80).
    z = torch.randn([1, 3, 16, 16], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = nets['generator'](80 * z, torch.full([1], 80.0), torch.nn.functional.one_hot(torch.tensor([3]), 4).float())
    expected = (y * 127.5 + 128).clip(0, 255).to(torch.uint8)[0].permute(1, 2, 0).numpy()
    assert np.abs(read_png(tmp_path / 'batch.zip', 3).astype(int) - expected).max() <= 1
    assert not np.array_equal(read_png(tmp_path / 'batch.zip', 2), read_png(tmp_path / 'batch.zip', 3))

def test_stochastic_teacher_sampler_image_regenerates_alone(tmp_path):
    nets = write_run(tmp_path)
    common = ['--teacher', nets['teacher_path'], '--sampler', 'imagenet64', '--steps', '3']      # churn: per-seed noise
    evaluate.main(['generate', *common, '--outdir', str(tmp_path / 'batch'), '--seeds', '0-3', '--batch', '4'])
    evaluate.main(['generate', *common, '--outdir', str(tmp_path / 'alone'), '--seeds', '2', '--batch', '1'])
    assert np.array_equal(read_png(tmp_path / 'batch', 2), read_png(tmp_path / 'alone', 2))

def test_fid_of_run_equals_fid_of_its_written_images(tmp_path):
    # Generating straight into the detector and going through lossless PNGs (EDM's route) agree.
    nets = write_run(tmp_path)
    detector = str(tmp_path / 'detector.pt')
    torch.jit.script(TinyDetector(32)).save(detector)
    write_pngs(str(tmp_path / 'data'), 8, size=16)
    common = ['--ref', str(tmp_path / 'data'), '--detector', detector, '--num-images', '6']
    evaluate.main(['fid', '--ckpt', nets['run'], *common, '--repeats', '2', '--report', str(tmp_path / 'run.json')])
    evaluate.main(['generate', '--ckpt', nets['run'], '--outdir', str(tmp_path / 'gen'), '--seeds', '6-11'])
    evaluate.main(['fid', '--images', str(tmp_path / 'gen'), *common, '--report', str(tmp_path / 'images.json')])
    run, images = json.load(open(tmp_path / 'run.json')), json.load(open(tmp_path / 'images.json'))
    assert [s['seeds'] for s in run['sets']] == ['0-5', '6-11']
    for m in ('fid', 'precision', 'recall'):
        assert run['sets'][1][m] == pytest.approx(images['sets'][0][m], rel=1e-6, abs=1e-9)
    assert run['summary']['fid']['min'] == min(s['fid'] for s in run['sets']) > 0

def test_weights_diagnostic_fig5(tmp_path):
    # One sigma bin and forward-KL (h(r) = r): the normalised weight must be r / mean(r) exactly.
    nets = write_run(tmp_path, f='fkl', num_bins=1)
    evaluate.main(['weights', '--ckpt', nets['run'], '--num-images', '12', '--batch', '5'])
    out = json.load(open(os.path.join(nets['run'], 'weights-checkpoint-0000010.json')))
    table = out['samples_sorted_by_score_diff']
    assert sorted(table['seed']) == list(range(12)) and table['score_diff'] == sorted(table['score_diff'])
    r, h = np.array(table['r']), np.array(table['h'])
    np.testing.assert_allclose(h, r / r.mean(), rtol=1e-5)
    assert np.ptp(h) > 0.01 and os.path.isfile(os.path.join(nets['run'], 'weights-checkpoint-0000010.png'))
    # Recompute one sample by hand: its latent, then its sigma level and noise, all from its own seed.
    i = 4
    seed, sigma = table['seed'][i], table['sigma'][i]
    g = torch.Generator().manual_seed(seed)
    z, eps = torch.randn([1, 3, 16, 16], generator=g), torch.randn([1, 3, 16, 16], generator=g)
    label = torch.nn.functional.one_hot(torch.tensor([seed % 4]), 4).float()
    with torch.no_grad():
        y = nets['generator'](80 * z, torch.full([1], 80.0), label)
        x = y + sigma * eps
        diff = (nets['teacher'](x, torch.full([1], sigma), label) - nets['fake_score'](x, torch.full([1], sigma), label)) / sigma ** 2
    assert table['score_diff'][i] == pytest.approx(float(diff.square().sum()), rel=1e-4)
    assert sigma in fdistill.karras_sigmas(1000).float().tolist()

def test_latency_reports_both(tmp_path):
    nets = write_run(tmp_path)
    evaluate.main(['latency', '--ckpt', nets['run'], '--steps', '2', '--warmup', '1', '--repeats', '2', '--report', str(tmp_path / 'lat.json')])
    report = json.load(open(tmp_path / 'lat.json'))
    assert report['teacher_steps'] == 2 and report['one_step_seconds'] > 0 and report['teacher_seconds'] > 0

#----------------------------------------------------------------------------
# CLIP score with a tiny CLIP model folder written by the test (character-level BPE vocabulary).

def write_tiny_clip(folder):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer
    os.makedirs(folder, exist_ok=True)
    letters = 'abcdefghijklmnopqrstuvwxyz'
    vocab = {token: i for i, token in enumerate([*letters, *(c + '</w>' for c in letters), '<|startoftext|>', '<|endoftext|>'])}
    with open(os.path.join(folder, 'vocab.json'), 'w') as f:
        json.dump(vocab, f)
    with open(os.path.join(folder, 'merges.txt'), 'w') as f:
        f.write('#version: 0.2\n')
    tokenizer = CLIPTokenizer(os.path.join(folder, 'vocab.json'), os.path.join(folder, 'merges.txt'))
    images = CLIPImageProcessor(size={'shortest_edge': 32}, crop_size={'height': 32, 'width': 32})
    CLIPProcessor(image_processor=images, tokenizer=tokenizer).save_pretrained(folder)
    config = CLIPConfig(projection_dim=8,
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         max_position_embeddings=77, bos_token_id=vocab['<|startoftext|>'], eos_token_id=vocab['<|endoftext|>']),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    CLIPModel(config).save_pretrained(folder)

def test_clip_score_is_mean_raw_cosine(tmp_path):
    from transformers import CLIPModel, CLIPProcessor
    write_tiny_clip(str(tmp_path / 'clip'))
    images = write_pngs(str(tmp_path / 'images'), 5)
    captions = ['a red cat', 'two dogs on a bench', 'a train', 'blue sky', 'a bowl of soup', 'unused extra caption']
    (tmp_path / 'captions.txt').write_text('\n'.join(captions) + '\n')
    evaluate.main(['clip', '--images', str(tmp_path / 'images'), '--captions', str(tmp_path / 'captions.txt'),
                   '--clip-model', str(tmp_path / 'clip'), '--batch', '2', '--report', str(tmp_path / 'clip.json')])
    score = json.load(open(tmp_path / 'clip.json'))['clip_score']
    # Independently: projected embeddings of each image and its caption, normalised, cosine, mean.
    model = CLIPModel.from_pretrained(str(tmp_path / 'clip'), local_files_only=True).eval()
    processor = CLIPProcessor.from_pretrained(str(tmp_path / 'clip'), local_files_only=True)
    with torch.no_grad():
        pixels = processor(images=[PIL.Image.fromarray(x) for x in images], return_tensors='pt')['pixel_values']
        text = processor(text=captions[:5], return_tensors='pt', padding=True)
        v = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
        t = model.text_projection(model.text_model(input_ids=text['input_ids'], attention_mask=text['attention_mask']).pooler_output)
    expected = torch.nn.functional.cosine_similarity(v, t).mean().item()
    assert score == pytest.approx(expected, abs=1e-5) and abs(score) > 1e-3
    with pytest.raises(SystemExit, match='CLIP model folder'):
        evaluate.main(['clip', '--images', str(tmp_path / 'images'), '--captions', str(tmp_path / 'captions.txt'), '--clip-model', str(tmp_path)])

#----------------------------------------------------------------------------
# Text-to-image: a real train_t2i.py checkpoint (one iteration on a tiny SD folder written here, with an EMA
# that differs from the raw generator), sampled through the same generate / FID / CLIP / latency code.

PROMPTS = ['a cat', 'a dog', 'cat and dog']

@pytest.fixture(scope='module')
def t2i(tmp_path_factory):
    from test_sd_unet import write_tiny_sd_folder
    from test_t2i import train
    d = tmp_path_factory.mktemp('t2i-eval')
    write_tiny_sd_folder(str(d / 'sd'))
    images = write_pngs(str(d / 'images'), 4, size=20)
    with open(d / 'pairs.jsonl', 'w') as f:
        for i in range(len(images)):
            f.write(json.dumps(dict(image=f'images/{i:06d}.png', caption=PROMPTS[i % 3])) + '\n')
    train(d, d / 'run', '--iterations', '1', '--lr', '1e-2', '--ema-halflife-kimg', '1', '--ema-rampup', '0', nproc=1)   # an EMA unlike the generator
    (d / 'prompts.txt').write_text('\n'.join(PROMPTS) + '\n')
    return dict(dir=d, run=str(d / 'run'), sd=str(d / 'sd'), prompts=str(d / 'prompts.txt'))

def read_captions_txt(path_or_zip):
    if str(path_or_zip).endswith('.zip'):
        with zipfile.ZipFile(path_or_zip) as z:
            return z.read('captions.txt').decode().splitlines()
    return open(os.path.join(path_or_zip, 'captions.txt')).read().splitlines()

def tiny_sd_models(folder):
    import sd_unet
    return sd_unet.load_sd(folder)

# Batch 5 and batch 1 run different CPU matmul blockings, so a float32 result may differ in its last bits and
# flip a uint8 rounding now and then: "the same image" is up to one level on a few channels.
def same_image(a, b):
    diff = np.abs(a.astype(int) - b.astype(int))
    return a.shape == b.shape and diff.max() <= 1 and (diff > 0).mean() < 0.01

def expected_png(sd, latents_x0):
    import sd_unet
    return ((sd_unet.vae_decode(sd['vae'], latents_x0) * 127.5 + 128).clip(0, 255).to(torch.uint8))[0].permute(1, 2, 0).numpy()

def test_t2i_one_step_image_regenerates_alone_and_by_hand(t2i, tmp_path):
    import sd_unet
    common = ['--ckpt', t2i['run'], '--captions', t2i['prompts']]
    evaluate.main(['generate', *common, '--outdir', str(tmp_path / 'batch.zip'), '--seeds', '0-4', '--batch', '5'])
    evaluate.main(['generate', *common, '--outdir', str(tmp_path / 'alone'), '--seeds', '3', '--batch', '1'])
    assert read_captions_txt(tmp_path / 'batch.zip') == [PROMPTS[s % 3] for s in range(5)]     # seed s: line s mod N
    assert read_captions_txt(tmp_path / 'alone') == ['a cat']
    image = read_png(tmp_path / 'batch.zip', 3)
    assert image.shape == (16, 16, 3) and same_image(image, read_png(tmp_path / 'alone', 3))
    assert not same_image(image, read_png(tmp_path / 'batch.zip', 0))                        # same prompt, other seed
    # By hand: the EMA weights in an SDUNet, seed 3's latent from a generator seeded 3, prompt line 0, x0 at t = 999, VAE.
    ckpt = torch.load(os.path.join(t2i['run'], 'checkpoint-0000001.pt'), map_location='cpu', weights_only=True)
    assert any(not torch.equal(ckpt['generator'][k], ckpt['generator_ema'][k]) for k in ckpt['generator'])
    unet = sd_unet.SDUNet(**ckpt['unet_config']).eval()
    unet.load_state_dict({k[len('unet.'):]: v for k, v in ckpt['generator_ema'].items()})
    sd = tiny_sd_models(t2i['sd'])
    z = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ctx = sd_unet.encode_prompts(sd['tokenizer'], sd['text_encoder'], ['a cat'])
        x0 = sd_unet.eps_to_x0(z, unet(z, 999, ctx), 999)
    assert same_image(image, expected_png(sd, x0))

def test_t2i_sd_teacher_ddim_regenerates_alone_and_by_hand(t2i, tmp_path):
    import sd_unet
    common = ['--sd', t2i['sd'], '--captions', t2i['prompts'], '--steps', '3', '--cfg', '2']
    evaluate.main(['generate', *common, '--outdir', str(tmp_path / 'batch'), '--seeds', '0-2', '--batch', '3'])
    evaluate.main(['generate', *common, '--outdir', str(tmp_path / 'alone'), '--seeds', '2', '--batch', '1'])
    image = read_png(tmp_path / 'batch', 2)
    assert image.shape == (16, 16, 3) and same_image(image, read_png(tmp_path / 'alone', 2))
    assert not same_image(image, read_png(tmp_path / 'batch', 0))
    sd = tiny_sd_models(t2i['sd'])
    z = torch.randn([1, 4, 8, 8], generator=torch.Generator().manual_seed(2))
    ctx, uncond = (sd_unet.encode_prompts(sd['tokenizer'], sd['text_encoder'], [p]) for p in ('cat and dog', ''))
    x0 = sd_unet.ddim_sample(sd['unet'], z, ctx, uncond, num_steps=3, cfg=2.0)
    assert same_image(image, expected_png(sd, x0))

def test_t2i_clip_and_fid_go_through_the_generic_paths(t2i, tmp_path):
    # The same seeds scored on the fly and from the written zip (with its captions.txt) give the same numbers.
    # Both make the images in batches of 2 (another batch size may flip a uint8 level, see same_image) and score
    # them in batches of 2: the same CLIP calls on the same pixels, so only the float64 mean's order could differ.
    write_tiny_clip(str(tmp_path / 'clip'))
    common = ['--ckpt', t2i['run'], '--captions', t2i['prompts']]
    evaluate.main(['generate', *common, '--outdir', str(tmp_path / 'gen.zip'), '--seeds', '0-4', '--batch', '2'])
    clip = ['clip', '--clip-model', str(tmp_path / 'clip'), '--batch', '2']
    evaluate.main([*clip, *common, '--seeds', '0-4', '--report', str(tmp_path / 'live.json')])
    evaluate.main([*clip, '--images', str(tmp_path / 'gen.zip'), '--report', str(tmp_path / 'zip.json')])
    live, written = json.load(open(tmp_path / 'live.json')), json.load(open(tmp_path / 'zip.json'))
    assert live['num'] == written['num'] == 5 and live['sampler'] == 'one-step' and live['resolution'] == 16
    assert live['clip_score'] == pytest.approx(written['clip_score'], abs=1e-6) and abs(live['clip_score']) > 1e-3
    # FID: --num-images defaults to one image per caption (3 here), seeds 0-2.
    detector = str(tmp_path / 'detector.pt')
    torch.jit.script(TinyDetector(32)).save(detector)
    fid = ['fid', '--ref', str(t2i['dir'] / 'images'), '--detector', detector, '--no-pr']
    evaluate.main([*fid, *common, '--report', str(tmp_path / 'fid-live.json')])
    evaluate.main(['generate', *common, '--outdir', str(tmp_path / 'first3'), '--seeds', '0-2'])
    evaluate.main([*fid, '--images', str(tmp_path / 'first3'), '--num-images', '3', '--report', str(tmp_path / 'fid-images.json')])
    a, b = json.load(open(tmp_path / 'fid-live.json')), json.load(open(tmp_path / 'fid-images.json'))
    assert a['sets'][0]['seeds'] == '0-2' and a['sets'][0]['num'] == 3
    assert a['sets'][0]['fid'] == pytest.approx(b['sets'][0]['fid'], rel=1e-6) and a['sets'][0]['fid'] > 0

def test_t2i_latency_one_step_vs_ddim_teacher(t2i, tmp_path):
    evaluate.main(['latency', '--ckpt', t2i['run'], '--warmup', '1', '--repeats', '2', '--report', str(tmp_path / 'lat.json')])
    report = json.load(open(tmp_path / 'lat.json'))
    assert (report['teacher_sampler'], report['teacher_steps'], report['teacher_cfg']) == ('ddim', 50, 3.0)    # Table 4's teacher
    assert report['one_step_sampler'] == 'one-step' and 'text encoder' in report['timed']
    assert 0 < report['one_step_seconds'] < report['teacher_seconds']                     # 1 UNet pass vs 100

def test_t2i_missing_inputs_fail_with_one_line_before_sampling(t2i, tmp_path, monkeypatch):
    def no_sampling():
        raise AssertionError('inputs must be checked before any network is loaded')
    monkeypatch.setattr(evaluate, 'init_distributed', no_sampling)
    out = ['--outdir', str(tmp_path / 'out')]
    moved = rundir.load_checkpoint(os.path.join(t2i['run'], 'checkpoint-0000001.pt'))
    moved['sd'] = str(tmp_path / 'gone')                                  # trained on another machine
    rundir.save_checkpoint(str(tmp_path / 'checkpoint-0000001.pt'), moved)
    cases = [(['--ckpt', t2i['run'], '--sd', str(tmp_path / 'nosd'), '--captions', t2i['prompts']], 'nosd/unet/config.json not found; a diffusers-format'),
             (['--ckpt', str(tmp_path / 'checkpoint-0000001.pt'), '--captions', t2i['prompts']], 'pass --sd FOLDER'),
             (['--ckpt', t2i['run'], '--captions', str(tmp_path / 'none.txt')], 'Captions file'),
             (['--sd', t2i['sd']], 'needs prompts: pass --captions')]
    for args, expect in cases:
        with pytest.raises(SystemExit) as error:
            evaluate.main(['generate', *args, *out])
        assert expect in str(error.value) and '\n' not in str(error.value)
    with pytest.raises(SystemExit, match='CLIP model folder'):
        evaluate.main(['clip', '--ckpt', t2i['run'], '--captions', t2i['prompts'], '--clip-model', str(tmp_path)])
    with pytest.raises(SystemExit, match='implemented for EDM runs'):
        evaluate.main(['weights', '--ckpt', t2i['run']])
    assert not os.path.exists(tmp_path / 'out')

#----------------------------------------------------------------------------
#----------------------------------------------------------------------------
# Export: the student in formats loaded without this repository's checkpoints.

def test_export_edm_student_round_trips_exactly(tmp_path):
    # A snapshot file (the checkpoint keys; the EMA differs from the raw generator): the EMA weights leave.
    nets = write_run(tmp_path)
    ckpt = torch.load(os.path.join(nets['run'], 'checkpoint-0000010.pt'), map_location='cpu', weights_only=True)
    ema = randomized(copy.deepcopy(nets['generator']))
    snapshot = str(tmp_path / 'snapshot-0000010.pt')
    torch.save(dict(ckpt, generator_ema=ema.state_dict()), snapshot)
    dest = str(tmp_path / 'export')
    evaluate.main(['export', '--ckpt', snapshot, '--dest', dest])
    assert sorted(os.listdir(dest)) == ['README.md', 'generator.json', 'generator.safetensors']
    generator = edm_nets.load_generator(dest)
    official = edm_pickle.load_edm_pickle(nets['teacher_path'])['ema'].state_dict()     # keys of NVIDIA's pickle format
    state = generator.net.state_dict()
    assert state.keys() == official.keys() and all(torch.equal(state[k], ema.state_dict()[k]) for k in state)
    assert generator.sigma_init == 80.0 and json.load(open(os.path.join(dest, 'generator.json')))['weights'] == 'generator_ema'
    z, labels = torch.randn(3, 3, 16, 16), torch.eye(4)[[0, 1, 3]]
    with torch.no_grad():
        expected = evaluate.load_generator(dict(ckpt, generator_ema=ema.state_dict()), 'cpu')(z, labels)
        assert torch.equal(generator(z, labels), expected)                    # same weights, same code: bitwise
    assert not torch.equal(expected, evaluate.load_generator(ckpt, 'cpu')(z, labels))
    readme = open(os.path.join(dest, 'README.md')).read()                    # its snippet runs as written
    scope = {}
    exec(readme.split('```python\n')[1].split('```')[0], scope)
    assert scope['images'].shape == (16, 3, 16, 16) and torch.isfinite(scope['images']).all()
    with pytest.raises(SystemExit, match='holds an EDM export of the same kind; export writes only into a new or empty folder'):
        evaluate.main(['export', '--ckpt', snapshot, '--dest', dest])

def test_export_sd_student_loads_in_diffusers(t2i, tmp_path, monkeypatch):
    import logging
    import warnings
    import diffusers
    import sd_unet
    dest = str(tmp_path / 'unet')
    evaluate.main(['export', '--ckpt', t2i['run'], '--dest', dest])
    assert sorted(os.listdir(dest)) == ['README.md', 'config.json', 'diffusion_pytorch_model.safetensors']
    # diffusers' own class loads it, and says nothing about missing, unexpected or ignored keys or config fields.
    messages = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = lambda record: messages.append(record.getMessage())
    logging.getLogger('diffusers').addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            unet = diffusers.UNet2DConditionModel.from_pretrained(dest).eval()
    finally:
        logging.getLogger('diffusers').removeHandler(handler)
    messages += [str(w.message) for w in caught]
    assert not [m for m in messages if re.search(r'missing|unexpected|not used|were not initialized|newly initialized|ignored', m, re.I)], messages
    ckpt = evaluate.load_checkpoint(t2i['run'])
    ours = evaluate.load_sd_generator(ckpt, 'cpu').unet                       # the EMA weights, as evaluate samples them
    torch.manual_seed(1)
    z, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 32)
    with torch.no_grad():
        # Same weights, the same float32 operations in another order (attention, GEGLU): rounding-level differences.
        torch.testing.assert_close(unet(z, 999, ctx).sample, ours(z, 999, ctx), atol=1e-5, rtol=1e-4)
    raw = sd_unet.SDUNet(**ckpt['unet_config'])
    raw.load_state_dict({k[len('unet.'):]: v for k, v in ckpt['generator'].items()})
    with torch.no_grad():
        assert (unet(z, 999, ctx).sample - raw(z, 999, ctx)).abs().max() > 1e-3   # not the raw generator
    # The README's snippet (diffusers VAE and text encoder, one step at t = 999) draws what `generate` draws.
    evaluate.main(['generate', '--ckpt', t2i['run'], '--captions', t2i['prompts'], '--outdir', str(tmp_path / 'ours'), '--seeds', '3', '--batch', '1'])
    snippet = open(os.path.join(dest, 'README.md')).read().split('```python\n')[1].split('```')[0]
    assert f"sd = {t2i['sd']!r}" in snippet
    monkeypatch.chdir(tmp_path)
    exec(snippet.replace("prompt, seed = 'a photograph of an astronaut riding a horse', 0", "prompt, seed = 'a cat', 3"), {})
    assert same_image(np.array(PIL.Image.open(tmp_path / 'sample.png')), read_png(tmp_path / 'ours', 3))
