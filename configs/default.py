"""Every knob of adreg_jax in one place. Variants (ixi.py, dirlab.py, demo.py) import this file
and change a few fields.

    python train.py --config configs/default.py --workdir runs/default
    python train.py --config configs/default.py --workdir runs/lr3e-4 \
        --config.train.learning_rate=3e-4
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    config = ml_collections.ConfigDict()
    config.seed = 0

    # --- model (adreg_jax.models.build_model(config.model)) ---------------------------------
    model = config.model = ml_collections.ConfigDict()
    model.channels = (16, 32, 64, 128, 256)  # one entry per U-Net level, finest first
    model.convs_per_level = 2
    model.norm = "instance"  # "instance" | "layer" | "none"
    model.leaky_relu_slope = 0.2
    model.use_cross_attention = True
    model.cross_attention_levels = (3, 4)  # 0 = finest level
    model.attention_heads = 4
    model.attention_window = 4  # window edge (tokens) for windowed attention at large levels
    model.global_attention_max_tokens = 4096  # levels with at most this many tokens attend globally
    model.use_regional_attention = True
    model.region_size = (2, 2, 2)  # RAA patch size in voxels of the deepest feature map
    model.region_heads = 4
    model.use_multires = True
    model.diffeomorphic = False
    model.integration_steps = 7
    model.dtype = "float32"  # compute dtype: "float32" | "bfloat16" (parameters stay float32)

    # --- data (adreg_jax.data) ---------------------------------------------------------------
    data = config.data = ml_collections.ConfigDict()
    data.dataset = "generated_brain"  # generated_brain | generated_lung | ixi | dirlab | pairs
    data.root = ""  # data set folder (ixi, dirlab) or pair-list file (pairs)
    data.image_size = (96, 112, 96)  # (D, H, W) the network sees
    data.batch_size = 1
    data.num_workers = 0  # Grain worker processes (0 = in the main process)
    data.prefetch = 2
    data.augment_flip = False
    data.anatomy_voxels = 2.0  # generated data: largest anatomical velocity component (voxels)
    data.motion_voxels = 4.0  # generated data: largest velocity component of the pair's motion
    data.intensity = 1.0  # generated data: strength of gamma / bias / noise changes, 0 = off
    data.val_size = 4  # held-out pairs for validation (generated data)
    data.test_size = 8

    # --- loss (adreg_jax.losses) -------------------------------------------------------------
    loss = config.loss = ml_collections.ConfigDict()
    loss.ncc_weight = 1.0
    loss.ncc_window = 9
    loss.ssim_weight = 1.0
    loss.smooth_weight = 1.0
    loss.jacobian_weight = 0.1
    loss.landmark_weight = 0.0

    # --- training (adreg_jax.training) -------------------------------------------------------
    train = config.train = ml_collections.ConfigDict()
    train.learning_rate = 1e-4
    train.lr_decay_factor = 0.5
    train.lr_decay_epochs = 20  # multiply the rate by lr_decay_factor every this many epochs
    train.steps_per_epoch = 100
    train.epochs = 200
    train.max_steps = -1  # > 0 caps the run (overrides epochs)
    train.log_every = 10
    train.eval_every = 100
    train.checkpoint_every = 100
    train.keep_best = 3
    train.best_metric = "val/dice"  # early stopping and best-K use this
    train.best_mode = "max"
    train.early_stopping_patience = 20  # evaluations without improvement; <= 0 disables
    train.overwrite = False

    return config
