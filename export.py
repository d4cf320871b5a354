"""Exporting a student: the one-step generator of a run in the formats people load elsewhere.

  python evaluate.py export   --ckpt runs/00000-cifar --dest exported/    # also SD runs: a diffusers UNet folder
The subcommand is dispatched by evaluate.py.
"""

import os

import sd_unet
from distributed import print0
from students import check_not_inputs, check_output, generator_weights, is_t2i, load_checkpoint, load_generator, write_file, write_json

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
    write_file(os.path.join(dest, weights_name), lambda f: f.write(data))
    write_json(os.path.join(dest, config_name), config)

# The files of each kind of export. --dest must be new or empty: a folder holding anything else -- a user's README.md,
# the other kind of export, or an earlier export of the same kind (whose checkpoint may since have been rotated away)
# -- is refused, never replaced or mixed; delete it yourself to export there again.
EXPORT_FILES = dict(SD=('README.md', 'config.json', 'diffusion_pytorch_model.safetensors'), EDM=('README.md', 'generator.json', 'generator.safetensors'))

def check_dest(dest, ckpt, kind):
    check_output('--dest', dest, kind='dir')
    check_not_inputs('--dest', [dest], [('--ckpt', ckpt['path']), ('the run directory of --ckpt', os.path.dirname(ckpt['path']))])
    found = sorted(os.listdir(dest)) if os.path.isdir(dest) else []
    if not found:
        return
    held = [k for k, names in EXPORT_FILES.items() if set(names[1:]) <= set(found)]
    what = f'an {held[0]} export' + (' of the same kind' if held[0] == kind else f', and this {kind} run cannot go there') if held else f'{len(found)} other file(s): {", ".join(found[:3])}{", ..." if len(found) > 3 else ""}'
    raise FileExistsError(f'--dest "{dest}" is not empty: it holds {what}; export writes only into a new or empty folder: pass one (or delete "{dest}" to export there again)')

def cmd_export(args):
    ckpt = load_checkpoint(args.ckpt)
    check_dest(args.dest, ckpt, 'SD' if is_t2i(ckpt) else 'EDM')
    weights = generator_weights(ckpt)
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
    write_file(os.path.join(args.dest, 'README.md'), lambda f: f.write(readme.encode()))
    print0(f'Exported the {weights} weights of "{ckpt["path"]}" to "{args.dest}" (see its README.md)')

#----------------------------------------------------------------------------
