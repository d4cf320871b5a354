"""f-distill on ImageNet 64x64 with the EDM teacher (Table 5, ImageNet-64 column).

    torchrun --nproc_per_node=8 train_imagenet.py --f js \\
        --teacher edm-imagenet-64x64-cond-adm.pkl --data imagenet-64x64.zip --outdir runs/imagenet-js
"""

import train_edm

PRESET = dict(
    outdir      = 'runs/imagenet64',
    f           = 'js',             # Best ImageNet-64 FID in Table 3 (Jensen-Shannon, 1.16).
    batch       = 512,              # Table 5.
    tau         = 5,
    w_gan       = 3e-3,
    disc_res    = '8',              # Output of enc.8x8_block2, 768 channels.
    iterations  = 380000,
    lr          = 2e-6,
    lr2         = 5e-7,             # Second stage (App. B): fine-tune at 5e-7 after 200k iterations.
    lr2_at      = 200000,
    r1_gamma    = 0.0,
    ema_halflife_kimg = 800,        # ~2% of the 38.9 Mimg the generator sees (EDM's ImageNet ratio: --ema 50 Mimg of 2.5 Gimg).
    snap_every  = 10000,            # 39 snapshots of 2.4 GB.
    precision   = 'bf16',           # The released ADM runs in fp16 (use_fp16=True); bf16 is as fast with fp32's range, no loss scaling.
    # The released edm-imagenet-64x64-cond-adm.pkl architecture (used by --random-teacher benchmarks).
    teacher_kwargs = dict(img_resolution=64, img_channels=3, label_dim=1000, use_fp16=True, model_type='DhariwalUNet',
        model_channels=192, channel_mult=[1, 2, 3, 4], dropout=0.1),
)

if __name__ == '__main__':
    train_edm.main(__doc__, PRESET)
