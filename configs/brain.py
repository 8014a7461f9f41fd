"""The shipped brain model (``adreg-register --model brain``): AD-RegNet trained on synthesised
brain pairs (``adreg_jax.data.synth``) with a label loss only, SynthMorph's recipe, so that the
network does not depend on the scans' contrast.

    python train.py --config configs/brain.py --workdir runs/brain
    python -m adreg_jax.pretrained export --workdir runs/brain --name brain
    python eval.py --config configs/brain.py --workdir runs/brain_pretrained --model brain

Data: pairs synthesised from the packaged 2 mm MNI152 labels at the 2 mm MNI grid's extent
(96 x 112 x 96 voxels, each side a multiple of 16): random smooth deformations up to
``synth_max_mm`` and small affine maps, random intensities per (sub-)label, blur, bias field,
gamma, noise. Loss: soft Dice over CSF, grey and white matter (``loss.dice_weight``) with the
diffusion regulariser and the negative-Jacobian penalty; no image similarity (fixed and moving
have different contrasts). ``model.channels``, ``convs_per_level``, the steps and the learning
rate are a first guess, to be confirmed by the training run.

Steps: TO BE FILLED. Time: TO BE FILLED (measured on TO BE FILLED).
"""

from configs import default


def get_config():
    config = default.get_config()
    # about 2 million parameters: 4 MB of float16 weights in the package (at most 30 MB)
    config.model.channels = (16, 32, 32, 64, 64)
    config.model.convs_per_level = 2

    config.data.dataset = "synth_brain"
    config.data.image_size = (96, 112, 96)
    config.data.num_workers = 2  # a synthesised pair takes about 2 s of one core
    config.data.val_size = 8
    config.data.test_size = 16

    config.loss.dice_weight = 1.0
    config.loss.ncc_weight = 0.0
    config.loss.ssim_weight = 0.0
    # the mean squared voxel gradient of the DDF against 1 - soft Dice, as SynthMorph's lambda = 1
    # (a smooth field of the synthesised size costs about 1e-3 here, a rough one far more: the
    # Dice gains of registration are about 0.1); folding is watched on the validation pairs
    # (val/folding_percent, < 0.1 % wanted): raise it if the field folds
    config.loss.smooth_weight = 1.0

    config.train.learning_rate = 1e-4
    config.train.steps_per_epoch = 500
    config.train.lr_decay_epochs = 4  # halve the rate every 2000 steps
    config.train.max_steps = 6000
    config.train.log_every = 50
    config.train.eval_every = 500
    config.train.checkpoint_every = 500
    config.train.best_metric = "val/dice"
    config.train.early_stopping_patience = 0
    return config
