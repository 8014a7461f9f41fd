"""The shipped brain model (``adreg-register --model brain``): AD-RegNet trained on pairs
synthesised from the packaged MNI152 labels (``adreg_jax.data.synth``), whose true field is known.

    python train.py --config configs/brain.py --workdir runs/brain
    python -m adreg_jax.pretrained export --workdir runs/brain --name brain
    python eval.py --config configs/brain.py --workdir runs/brain_pretrained --model brain

Data: pairs synthesised from the packaged 2 mm MNI152 labels over the 2 mm MNI grid's extent
(96 x 112 x 96 voxels) sampled at 6 mm (32 x 40 x 32): a random subject (a smooth deformation up
to ``synth_max_mm`` after a small affine map) as the moving image and the same subject under a
second such map as the fixed one, so that the true field is known; intensities drawn per
(sub-)label with blur, bias field, gamma and noise. Here both images take the atlas's own T1
contrast (``synth_same_contrast`` = ``synth_real_contrast`` = 1): the brain pairs people register
are T1 pairs, and matching is learnt far sooner on one contrast (for any contrast, lower both).
Loss: local NCC + soft Dice over CSF, grey and white matter + the mean end-point error against
the known field (``loss.ddf_weight``), with the diffusion regulariser and the negative-Jacobian
penalty.

Why this recipe, measured on the 2-core CPU (validation pairs, "before" = no registration): the
label loss alone (the earlier recipe, 48 x 56 x 48, contrasts drawn at random) left the
validation Dice at 0.434 -> 0.435 after 1000 steps; with the known-field term added it was still
flat after 250 steps (end-point error 1.967 -> 1.969 voxels), and on one shared T1 contrast without
NCC after 200 (Dice 0.458 -> 0.458); with NCC added, as here, it rose after 200 steps
(Dice 0.458 -> 0.474, end-point error 1.558 -> 1.480).

The shipped weights (adreg_jax/weights/brain.npz): this config's full model as trained in the
ablation study on one H200 GPU, the five variants at once for 6 minutes, cut at the last step all
of them had validated (5200; the full model is the slowest variant):

    python benchmarks/ablation.py --config configs/brain.py --workdir runs/gpu_ablation \\
        --minutes 6 --config.data.num_workers=2
    python -m adreg_jax.pretrained export --workdir runs/gpu_ablation/ad-regnet-full --name brain

(``train.py`` with this config runs the same 5200 steps on the same batches; on the 2-core CPU a
step takes 1.3 s, about 2 h in all, which is why the shipped run was made on the GPU.) Best
checkpoint by val/dice: step 5200. Validation (4 held-out pairs): Dice over CSF/GM/WM 0.458 ->
0.598, end-point error 1.558 -> 0.832 voxels; test (16 pairs): Dice 0.513 -> 0.637, det J <= 0 at
0.009 %. On the real brain pairs it is still no better than the affine stage (model card:
adreg_jax/weights/brain.md).
"""

from configs import default


def get_config():
    config = default.get_config()
    # Sized for a 2-core CPU: 4 levels, one conv each (a training step of the 5-level, 2-conv
    # model at 96x112x96 took 52 s there under load, this one at 48x56x48 2-5 s).
    config.model.channels = (16, 32, 32, 64)
    config.model.convs_per_level = 1
    config.model.cross_attention_levels = (2, 3)
    config.model.attention_heads = 2
    config.model.region_heads = 2

    config.data.dataset = "synth_brain"
    # the 2 mm MNI grid's extent (96x112x96 voxels) at 6 mm: the network sees scans resampled to
    # about 6 mm (adreg-register resamples to this many voxels and back); a step costs a third
    # of one at 4 mm (48x56x48), which this CPU could not train far enough
    config.data.image_size = (32, 40, 32)
    config.data.num_workers = 2  # as in the shipped run (any count reads the same batches)
    config.data.val_size = 4
    config.data.test_size = 16
    # both images in the atlas's own T1 contrast (see the docstring)
    config.data.synth_same_contrast = 1.0
    config.data.synth_real_contrast = 1.0

    config.loss.dice_weight = 1.0
    # the known field of each synthesised pair (mean end-point error, voxels): a dense target at
    # every voxel; with the label overlap alone 1000 steps did not move the validation Dice
    config.loss.ddf_weight = 1.0
    config.loss.ncc_weight = 1.0  # the image term that got the network started
    config.loss.ssim_weight = 0.0
    # the mean squared voxel gradient of the DDF against 1 - soft Dice, as SynthMorph's lambda = 1
    # (a smooth field of the synthesised size costs about 1e-3 here, a rough one far more: the
    # Dice gains of registration are about 0.1); folding is watched on the validation pairs
    # (val/folding_percent, < 0.1 % wanted): raise it if the field folds
    config.loss.smooth_weight = 1.0

    config.train.learning_rate = 1e-3
    config.train.steps_per_epoch = 250
    config.train.lr_decay_epochs = 4  # halve the rate every 1000 steps
    config.train.max_steps = 5200
    config.train.log_every = 25
    config.train.eval_every = 200
    config.train.checkpoint_every = 200
    config.train.best_metric = "val/dice"
    config.train.early_stopping_patience = 0
    return config
