"""Reading a run: PNG plots of its stats.jsonl (and of FID per snapshot), and the Fig. 5 diagnostic of its weights.

  python evaluate.py plot     --ckpt runs/00000-cifar                  # PNGs into runs/00000-cifar/plots/
  python evaluate.py weights  --ckpt runs/00000-cifar --num-images 6400
The subcommands are dispatched by evaluate.py; README.md's "Reading a run" says what to look for.
"""

import json
import os

import numpy as np
import torch

import distributed
import fdistill
import sd_unet
from distributed import gather_rows, get_rank, get_world_size, print0
from students import (TEACHER_HINT, Progress, check_file, check_not_inputs, check_output, class_labels, is_t2i, latents, load_checkpoint,
                      load_generator, load_teacher, rank_batches, write_file, write_json)

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
        z, rnd = latents((generator.net.img_channels, generator.net.img_resolution, generator.net.img_resolution), batch_seeds, device)
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
    save_figure(fig, path)

#----------------------------------------------------------------------------
# Plots of a run, for reading it ("Reading a run" in README.md): stats.jsonl (and fid-snapshots.json where
# `evaluate.py fid` scored the run's snapshots) as one PNG per group, panels sharing the iteration axis.
# Dashed grey lines mark where a run at chance sits (discriminator loss 2 ln 2, accuracy 0.5, r = 1, ESS 1)
# and the clip of r.

# A run's files, checked before anything is drawn: each bad one is one line naming it. A torn last line of
# stats.jsonl (a run killed, or still running, while writing it) is left out, as --resume does.
def read_stats(run):
    path = os.path.join(run, 'stats.jsonl')
    if not os.path.isfile(path):
        raise FileNotFoundError(f'{path} not found: pass a run directory written by train_cifar.py, train_imagenet.py or train_t2i.py')
    with open(path, 'rb') as f:
        lines = [line for line in f.read().split(b'\n') if line.strip()]
    stats = []
    for number, line in enumerate(lines, 1):
        try:
            entry = json.loads(line)
            good = isinstance(entry, dict) and type(entry.get('iteration')) is int and all(
                v is None or type(v) in (int, float) for k, v in entry.items())
        except ValueError:                                      # not JSON, or not UTF-8
            entry, good = None, False
        if not good and number == len(lines) and entry is None:
            break
        if not good:
            raise ValueError(f'{path} line {number} is not a stats line of training_loop.py (a JSON object of numbers with an integer "iteration"): '
                             f'the file is damaged or foreign; pass a run directory written by train_*.py')
        stats.append(entry)
    if not stats:
        raise ValueError(f'{path} is empty: the run has not logged yet (every --log-every iterations)')
    return stats

def read_json(path, what, fix):
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except ValueError as err:                                   # not JSON, or not UTF-8
        raise ValueError(f'{path} is not readable JSON ({type(err).__name__}: {" ".join(str(err).split())[:80]}): {what}; {fix}') from None

OPTION_TYPES = dict(f=str, num_bins=int, r_min=(int, float), r_max=(int, float))

def read_options(run):
    path = os.path.join(run, 'training_options.json')
    if not os.path.isfile(path):
        return {}
    fix = 'restore it from the run, or move it away to plot without it'
    options = read_json(path, 'it holds the flags of the run', fix)
    bad = [k for k, t in OPTION_TYPES.items() if isinstance(options, dict) and k in options and (type(options[k]) is bool or not isinstance(options[k], t))]
    if not isinstance(options, dict) or bad or options.get('num_bins', 1) < 1:
        raise ValueError(f'{path} is not the training_options.json of a train_*.py run (bad {", ".join(bad) or "num_bins" if isinstance(options, dict) else "content"}): {fix}')
    return options

# fid-snapshots.json is a cache that `fid --snapshots` rebuilds: an unreadable one is named and its figure skipped.
def read_fid(run):
    path = os.path.join(run, 'fid-snapshots.json')
    if not os.path.isfile(path):
        return None
    try:
        fid = read_json(path, '', '')
        if not all(type(e['iteration']) is int and type(e['fid']) is float for e in fid['snapshots']):
            raise ValueError('an entry without an integer iteration and a float fid')
        best = fid.get('best')
        if best is not None and not (type(best['iteration']) is int and type(best['fid']) is float):
            raise ValueError('a "best" without an integer iteration and a float fid')
        return fid
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        print0(f'Skipping the FID figure: {path} cannot be read ({type(err).__name__}); `evaluate.py fid --snapshots --ckpt {run} ...` rebuilds it')
        return None

# The stage-1 sigma bins of a run, as "a-b" labels (training_loop: fdistill.sigma_bin_edges on the task's levels).
def bin_labels(options):
    levels = sd_unet.SIGMAS.float() if options.get('sd') else fdistill.karras_sigmas(1000, 0.002, 80)
    n = options.get('num_bins', 10)
    cuts = [float(levels[int(0.02 * len(levels))])] + fdistill.sigma_bin_edges(levels, n).tolist() + [float(levels[int(0.98 * len(levels)) - 1])]
    return [f'σ {cuts[k]:.3g}–{cuts[k + 1]:.3g}' for k in range(n)]

PLOT_NAMES = ('losses', 'weights', 'discriminator', 'speed', 'fid')

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
    assert tuple(groups) + ('fid',) == PLOT_NAMES
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
    outdir = args.outdir or os.path.join(run, 'plots')
    check_output('--outdir', outdir, kind='dir')
    inputs = [(f'the run\'s {name}', os.path.join(run, name)) for name in ('stats.jsonl', 'training_options.json', 'fid-snapshots.json')]
    check_not_inputs('--outdir', [outdir] + [os.path.join(outdir, f'{name}.png') for name in PLOT_NAMES], inputs)
    stats, options, fid = read_stats(run), read_options(run), read_fid(run)
    for name, fig in run_figures(stats, options, fid):
        path = os.path.join(outdir, f'{name}.png')
        save_figure(fig, path)
        print0(f'wrote {path}')

def save_figure(fig, path):
    import matplotlib.pyplot as plt
    try:
        write_file(path, lambda f: fig.savefig(f, format='png', dpi=110))
    finally:
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
    name = os.path.splitext(os.path.basename(ckpt['path']))[0]
    check_output('--outdir', outdir, kind='dir')
    check_not_inputs('--outdir', [outdir] + [os.path.join(outdir, f'weights-{name}.{ext}') for ext in ('png', 'json')], [('--ckpt', ckpt['path']), ('--teacher', teacher_path)])
    device = distributed.init_distributed()[2]
    if args.num_images < get_world_size():
        raise ValueError(f'--num-images {args.num_images}: every one of the {get_world_size()} processes needs a sample')
    teacher = load_teacher(teacher_path, device)
    teacher.use_fp16 = False                                # as in training (train_edm.py)
    table, stats = weight_diagnostic(ckpt, teacher, list(range(args.seed, args.seed + args.num_images)), args.batch, device)
    if get_rank() == 0:
        f_name = fdistill.divergence(ckpt['options']['f']).name
        plot_weights(table, f_name, os.path.join(outdir, f'weights-{name}.png'))
        corr = float(np.corrcoef(np.log(np.maximum(table['score_diff'], 1e-30)), table['h'])[0, 1])
        write_json(os.path.join(outdir, f'weights-{name}.json'), dict(checkpoint=ckpt['path'], f=ckpt['options']['f'], num=args.num_images,
            corr_h_log_score_diff=corr, stats=stats, samples_sorted_by_score_diff=table))
        print0(f'{f_name}: corr(h, log score difference) = {corr:.3f}; wrote {os.path.join(outdir, f"weights-{name}.png")} and .json')

#----------------------------------------------------------------------------
