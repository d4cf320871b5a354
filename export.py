"""Exporting a student: the one-step generator of a run in the formats people load elsewhere.

  python evaluate.py export   --ckpt runs/00000-cifar --dest exported/    # also SD runs: a diffusers UNet folder
The subcommand is dispatched by evaluate.py.
"""

import os

import rundir
import sd_unet
from distributed import print0
from students import is_t2i, load_checkpoint, load_generator, write_json

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

#----------------------------------------------------------------------------
