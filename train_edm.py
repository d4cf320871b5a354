"""Algorithm 1 on an EDM teacher: the Task behind train_cifar.py and train_imagenet.py.

The two scripts differ only in their Table 5 preset; the networks, data and loop are all here and in
training_loop.py.
"""

import os
import sys

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

import dataset
import edm_nets
import edm_pickle
import distributed
import fdistill
import flags
import plan
import rundir
import training_loop

#----------------------------------------------------------------------------
# Flags of the EDM task (the loop's own flags come from flags.parse_args).

def add_edm_args(p):
    p.add_argument('--teacher',         default=None,               help='EDM teacher pickle, e.g. edm-imagenet-64x64-cond-adm.pkl')
    p.add_argument('--data',            default=None,               help='Real images for the GAN: zip or folder from EDM\'s dataset_tool.py')
    p.add_argument('--sigma-init',      default=80.0, type=flags.positive_float, help='Generator G(z) = D(sigma_init * z, sigma_init)')
    p.add_argument('--random-teacher',  action='store_true',        help='Benchmark only: the preset architecture with random weights, synthetic data')
    p.add_argument('--reg-weight',      default=0.0, type=flags.non_negative_float, help='Weight of DMD\'s LPIPS regression to teacher ODE pairs; 0 = off (paper setting)')
    p.add_argument('--reg-pairs',       default=10000, type=flags.positive_int, help='Number of (z, teacher ODE sample) pairs, generated once and cached')
    p.add_argument('--reg-batch',       default=16, type=flags.positive_int, help='Regression pairs per GPU per generator step')
    p.add_argument('--reg-steps',       default=18, type=flags.positive_int, help='Heun steps of the teacher sampler for the pairs (18 = 35 NFE)')
    p.add_argument('--lpips-vgg',       default=None,               help='torchvision VGG-16 weights (vgg16-397923af.pth) for LPIPS; needed with --reg-weight')

#----------------------------------------------------------------------------
# Networks: teacher from the official pickle, generator and fake score copied from it (dropout 0),
# a discriminator head on the teacher's features at the Table 5 resolutions.

def load_teacher(opts, preset):
    if opts.random_teacher:
        if not (opts.benchmark or opts.plan):
            raise ValueError('--random-teacher is for --benchmark only')
        teacher = edm_nets.EDMPrecond(**preset['teacher_kwargs'])
    else:
        if opts.teacher is None:
            raise ValueError('--teacher is required: the EDM pickle, e.g. edm-cifar10-32x32-cond-vp.pkl')
        teacher = edm_pickle.load_edm_pickle(opts.teacher)['ema']
    teacher.use_fp16 = teacher.init_kwargs['use_fp16'] = False   # fp32 or bf16 autocast (--precision); fp16 without loss scaling is fragile
    return teacher.eval().requires_grad_(False)

def check_data(data, teacher):
    name = f'Dataset {data.path}'
    if data.resolution != teacher.img_resolution or data.channels != teacher.img_channels:
        raise ValueError(f'{name} has {data.channels}x{data.resolution}x{data.resolution} images; the teacher wants {teacher.img_channels}x{teacher.img_resolution}x{teacher.img_resolution}')
    if teacher.label_dim and data.labels is None:
        raise ValueError(f'{name} has no labels (dataset.json) but the teacher is class-conditional ({teacher.label_dim} classes)')
    if teacher.label_dim and data.label_dim > teacher.label_dim:
        raise ValueError(f'{name} has labels up to {data.label_dim - 1} but the teacher has {teacher.label_dim} classes')

# Every image is decoded once before training, each rank its share (64x64 PNGs: about 0.1 ms each, so ImageNet-64
# takes 2-3 CPU-minutes split over the GPUs), so a damaged file is named now, not when an iteration first draws it.
def verify_images(data, rank, world):
    damaged = data.first_damaged(range(rank, len(data), world))
    found = [damaged] * world
    if dist.is_initialized():
        dist.all_gather_object(found, damaged)
    damaged = next((message for message in found if message is not None), None)
    if damaged is not None:
        raise ValueError(damaged)

def build_task(opts, preset, device, rank, world):
    teacher = load_teacher(opts, preset).to(device)
    if opts.random_teacher:
        data = None
    else:
        if opts.data is None:
            raise ValueError('--data is required: the real images for the GAN (zip or folder from EDM\'s dataset_tool.py)')
        data = dataset.ImageDataset(opts.data)
        check_data(data, teacher)
        verify_images(data, rank, world)
    generator = edm_nets.make_generator(teacher, opts.sigma_init)
    fake_score = edm_nets.copy_without_dropout(teacher)
    try:
        head_kwargs = dict(channels=edm_nets.feature_channels(teacher, opts.disc_res), resolutions=opts.disc_res)
    except ValueError as err:
        raise ValueError(f'--disc-res {",".join(map(str, opts.disc_res))}: {err}; pass --disc-res with some of those') from None
    head = fdistill.DiscriminatorHead(**head_kwargs)
    shape = (teacher.img_channels, teacher.img_resolution, teacher.img_resolution)
    num_classes = teacher.label_dim

    def cond(indices):
        if not num_classes:
            return None
        if data is None:                                        # Benchmark: class-balanced labels.
            return F.one_hot(torch.as_tensor(indices) % num_classes, num_classes).float().to(device)
        return data.one_hot(indices, num_classes).to(device)

    def real(indices):                                          # on the CPU: DataLoader workers call it
        if data is None:
            return torch.rand((len(indices),) + shape) * 2 - 1
        return data.images(indices).float() / 127.5 - 1

    return training_loop.Task(
        generator=generator, fake_score=fake_score, head=head,
        teacher=lambda x, sigma, labels, decoder='grad': teacher.forward_features(x, sigma, labels, opts.disc_res, decoder=decoder),
        cond=cond, real=real, num_real=len(data) if data is not None else 50000, z_shape=shape,
        to_images=lambda y: (y * 127.5 + 128).clamp(0, 255).to(torch.uint8),
        sigma_levels=fdistill.karras_sigmas(1000, 0.002, 80),         # EDM's sampling range (the pickles say 0, inf)
        sigma_data=teacher.sigma_data,
        meta=dict(generator_kwargs=generator.net.init_kwargs, sigma_init=opts.sigma_init, head_kwargs=head_kwargs),
        regression=regression_loss(opts, teacher, cond, shape, device, rank, world) if opts.reg_weight > 0 else None)

#----------------------------------------------------------------------------
# DMD's regression loss (DMD Sec. 3.3): LPIPS between G(z) and the teacher's ODE sample from the same
# z, on pairs generated once with EDM's Heun sampler and cached in the run directory.

def load_lpips(vgg_path, device):
    import lpips
    if vgg_path is None or not os.path.isfile(vgg_path):
        raise FileNotFoundError(f'--reg-weight needs VGG-16 weights for LPIPS: pass --lpips-vgg path/to/vgg16-397923af.pth (torchvision\'s ImageNet VGG-16; not found: {vgg_path})')
    model = lpips.LPIPS(net='vgg', pretrained=True, pnet_rand=True, verbose=False)   # pnet_rand: no download
    vgg = torch.load(vgg_path, map_location='cpu', weights_only=True)
    own = model.net.state_dict()                                # keys slice{k}.{i}.weight, i = torchvision's features index
    missing = [k for k in own if f'features.{k.split(".", 1)[1]}' not in vgg]
    if missing:
        raise ValueError(f'{vgg_path} is not torchvision VGG-16 weights (no features.{missing[0].split(".", 1)[1]})')
    model.net.load_state_dict({k: vgg[f'features.{k.split(".", 1)[1]}'] for k in own})
    return model.eval().requires_grad_(False).to(device)

def regression_pairs(opts, teacher, cond, shape, device, rank, world):
    os.makedirs(opts.outdir, exist_ok=True)
    path = os.path.join(opts.outdir, f'reg_pairs_{opts.reg_pairs}_{opts.reg_steps}steps.pt')
    if not os.path.isfile(path):
        seeds = np.arange(opts.reg_pairs)
        part = f'{path}.part{rank}'
        images = []
        for chunk in np.array_split(seeds[rank::world], max(1, len(seeds[rank::world]) // 64)):
            rnd = edm_nets.StackedRandomGenerator(device, chunk)
            z = rnd.randn([len(chunk), *shape], device=device)
            with torch.no_grad():
                images.append(edm_nets.edm_sampler(teacher, z, cond(chunk), num_steps=opts.reg_steps).float().cpu())
        rundir.atomic_write(part, lambda f: torch.save(torch.cat(images), f))
        distributed.barrier()
        if rank == 0:
            parts = [torch.load(f'{path}.part{r}', weights_only=True) for r in range(world)]
            x = torch.empty((len(seeds), *shape))
            for r in range(world):
                x[r::world] = parts[r]
            rundir.atomic_write(path, lambda f: torch.save(x, f))
        distributed.barrier()
        os.remove(part)
    return torch.load(path, map_location='cpu', weights_only=True)

def regression_loss(opts, teacher, cond, shape, device, rank, world):
    model = load_lpips(opts.lpips_vgg, device)
    targets = regression_pairs(opts, teacher, cond, shape, device, rank, world)

    def loss(generator, step):                  # step counts regression calls: resume stays exact
        g = torch.Generator().manual_seed(opts.seed * 2 ** 32 + step)
        idx = torch.randint(len(targets), (world * opts.reg_batch,), generator=g)[rank * opts.reg_batch:(rank + 1) * opts.reg_batch].numpy()
        z = edm_nets.StackedRandomGenerator(device, idx).randn([len(idx), *shape], device=device)
        y = generator(z, cond(idx))
        resize = lambda x: F.interpolate(x.float(), size=224, mode='bilinear', align_corners=False)
        return opts.reg_weight * model(resize(y), resize(targets[idx].to(device))).mean()
    return loss

#----------------------------------------------------------------------------

def main(description, preset, argv=None):
    with flags.user_errors(os.path.basename(sys.argv[0])):
        opts = flags.parse_args(description, preset, add_edm_args, argv)
        opts.random_teacher |= opts.plan            # --plan: the released architecture, no weights or data
        launch = plan.main if opts.plan else training_loop.main   # --plan: memory and FLOPs on fake tensors, no training
        return launch(opts, lambda opts, device, rank, world: build_task(opts, preset, device, rank, world))

#----------------------------------------------------------------------------
