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
    # 3-D convolutions: "auto" = "folded" (depth taps as 2-D convolutions, fast on XLA:CPU) on a
    # CPU, "native" (lax.conv_general_dilated, cuDNN) elsewhere; same parameters either way.
    model.conv_impl = "auto"
    model.remat = False  # recompute each conv block in the backward pass: less memory, more time

    # --- data (adreg_jax.data) ---------------------------------------------------------------
    data = config.data = ml_collections.ConfigDict()
    data.dataset = (
        "generated_brain"  # generated_brain | synth_brain | generated_lung | dirlab | ixi
    )
    # | pairs
    data.root = ""  # data set folder (dirlab) or pair-list file (pairs)
    data.image_size = (96, 112, 96)  # (D, H, W) the network sees (crop/pad or resample to it)
    data.batch_size = 1
    data.num_workers = 0  # Grain worker processes (0 = in the main process)
    data.prefetch = 2  # Grain read-ahead buffer (elements)
    data.augment_flip = False  # random flips of all three axes (train only)
    data.augment_intensity = 0.0  # strength of random gamma / scale, 0 = off (train only)
    data.train_size = 10**9  # distinct generated training pairs (fresh at every index)
    data.val_size = 4  # held-out pairs for validation (generated data)
    data.test_size = 8
    # generated brain pairs (adreg_jax.data.generated)
    data.anatomy_voxels = 2.0  # largest velocity of the atlas -> subject variation
    data.motion_voxels = 4.0  # largest velocity of the fixed -> moving motion
    data.intensity = 1.0  # gamma / bias field / noise strength, 0 = none
    # synthesised brain pairs (adreg_jax.data.synth): random contrasts drawn from label maps
    data.synth_max_mm = 8.0  # largest velocity of each subject's smooth deformation (mm)
    data.synth_affine = (5.0, 0.05, 4.0)  # largest rotation (degrees), scale (fraction), shift (mm)
    # the same for the map between a pair's images, the field to find (affine (0, 0, 0): what an
    # affine stage leaves)
    data.synth_pair_max_mm = 8.0
    data.synth_pair_affine = (5.0, 0.05, 4.0)
    # (low, high) mm between the control points of every smooth deformation, log-uniform per map:
    # how local a deformation is, the same on any grid
    data.synth_scale_mm = (32.0, 32.0)
    # a finer map inside every one of them: its largest velocity (mm, 0 = none) and (low, high)
    # mm between its control points (synth.subject_ddf)
    data.synth_detail_mm = 0.0
    data.synth_detail_scale_mm = (8.0, 16.0)
    data.synth_same_contrast = 0.3  # probability that fixed and moving share one contrast
    data.synth_real_contrast = 0.2  # probability that a contrast is the atlas's own T1
    # draw the training pairs on the accelerator (adreg_jax.data.synth_device: the same recipe in
    # JAX, no Grain workers; validation and test pairs stay the numpy generator's). For a GPU,
    # where the numpy workers set the pace; on a CPU the workers run beside the step instead.
    data.synth_on_device = False
    # with it, the probability that a training pair's anatomy is random shapes instead of the
    # atlas's (SynthMorph's anatomy-free pairs, adreg_jax.data.synth_device._shape_labels)
    data.synth_shapes = 0.0
    # generated lung phantom (adreg_jax.data.generated_lung)
    data.lung_motion_mm = (5.0, 20.0)  # range of the diaphragm motion
    data.lung_points = 32  # landmarks per generated lung pair
    # DIR-Lab (adreg_jax.data.dirlab)
    data.test_case = 1  # leave-one-case-out: held-out case for val/test
    data.cross_phase = True  # also train on T00 -> T10..T90 pairs (no landmarks)
    data.hu_window = (-1000.0, 500.0)  # HU clip before [0, 1]; () = no window
    data.isotropic_mm = 0.0  # > 0: resample to this isotropic spacing before crop/pad
    data.spacing_mm = ()  # (D, H, W) mm: resample to this spacing before crop/pad; () = no
    data.crop_center = "volume"  # crop/pad to image_size centred on the "volume" or the "lungs"
    data.hu_offset = 0.0  # added to the raw values to give HU (-1024 for HU + 1024 storage)
    data.max_points = 300  # landmarks padded to this N with points_mask

    # --- loss (adreg_jax.losses) -------------------------------------------------------------
    loss = config.loss = ml_collections.ConfigDict()
    loss.ncc_weight = 1.0
    loss.ncc_window = 9
    loss.ssim_weight = 1.0
    # NCC and SSIM count only the pairs whose two images share a contrast, when the batch says
    # (synth_brain's same_contrast flag; across contrasts they reward the wrong match). False:
    # every pair, as runs made before the flag (commit 4726ffb) trained: resume one with False to
    # keep its loss (train.py names this field when it resumes such a run)
    loss.same_contrast_only = True
    loss.smooth_weight = 1.0
    loss.jacobian_weight = 0.1
    loss.landmark_weight = 0.0
    # soft Dice of the warped moving labels against the fixed ones (the data set's labels, when the
    # batch carries fixed_seg / moving_seg); 0 = off, as in the paper (unsupervised)
    loss.dice_weight = 0.0
    # mean end-point error (voxels) against the known field of generated / synthesised pairs
    # (``true_ddf``), a supervised term; 0 = off
    loss.ddf_weight = 0.0

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
    # > 0: stop after this many minutes of wall time (from train_and_evaluate's start: data,
    # initialisation and compilation count, Python's imports before it do not), saving the last
    # step: the same command goes on from there (a scheduler's time limit; SIGTERM and Ctrl-C
    # stop and save the same way at any time)
    train.max_minutes = 0.0
    # a fresh run's starting parameters: a train.py run directory (its best checkpoint), a
    # weights file (.npz, adreg_jax.pretrained.export) or a packaged model's name (e.g. "brain");
    # "" = random initialisation
    train.init_from = ""

    return config
