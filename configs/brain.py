"""The shipped brain model (``adreg-register --model brain``): AD-RegNet trained on pairs
synthesised from the packaged MNI152 labels (``adreg_jax.data.synth``), whose true field is known.

    python train.py --config configs/brain.py --workdir runs/brain   # from scratch: see below
    python -m adreg_jax.pretrained export --workdir runs/brain --name brain
    python eval.py --config configs/brain.py --workdir runs/brain_pretrained --model brain

Data: pairs synthesised from the packaged 2 mm MNI152 labels over the 2 mm MNI grid's extent
(96 x 112 x 96 voxels) sampled at 4 mm (48 x 56 x 48): a random subject (a smooth deformation up
to ``synth_max_mm`` after a small affine map) as the moving image and the same subject under a
second, purely deformable map (what an affine stage leaves: ``synth_pair_affine`` = 0; mean 3-4
mm in the brain, as a real pair needs after the affine stage) as the fixed one, so that the true
field is known; every deformation varies over 16-48 mm (``synth_scale_mm``) and has a finer map
inside it, up to 8 mm over 8-16 mm (``synth_detail_mm``, ``synth_detail_scale_mm``): each subject
and each pair's field differ in detail too, as two anatomies do; intensities drawn per
(sub-)label with blur, bias field, gamma and noise. Half the pairs share one contrast and half
the contrasts are the atlas's own T1 (``synth_same_contrast`` = ``synth_real_contrast`` = 0.5):
T1 pairs are what people register most, and a network trained on them alone (step 4 below) lost
on a real T1 / T2-like pair what this one gains. Loss: local NCC on the pairs that share a
contrast (the pair's ``same_contrast``; across contrasts it rewards the wrong match) + soft Dice
over CSF, grey and white matter + the mean end-point error against the known field
(``loss.ddf_weight``), with the diffusion regulariser and the negative-Jacobian penalty.

How the shipped weights were made: five runs, each starting from the one before
(``train.init_from``), the first on a GPU, the other four on a 2-core CPU. Runs 2-4 drew T1
pairs only: add ``--config.data.synth_same_contrast=1 --config.data.synth_real_contrast=1`` to
their commands below to repeat them with this config.

1. The first shipped model (commit dc47378's ``configs/brain.py``: 6 mm, 32 x 40 x 32, pairs
   with an affine part, 1e-3), the full model of the ablation study, 5200 steps on one H200 GPU
   (6 minutes, shared with the other four variants): ``git show
   dc47378:adreg_jax/weights/brain.npz > brain_v1.npz``. Its deformations were bends of the whole
   brain: the generator then put 2 control points per axis on a 6 mm grid (fixed since,
   ``data.synth_scale_mm``).
2. 6 mm, local deformations, 3e-4 (best: step 200, validation Dice 0.716 -> 0.720; the run was
   stopped at step 430):

       python train.py --config configs/brain.py --workdir runs/brain_6mm \
           --config.data.image_size="(32,40,32)" --config.train.init_from=brain_v1.npz \
           --config.data.synth_detail_mm=0 \
           --config.train.learning_rate=3e-4 --config.train.max_steps=400 \
           --config.train.eval_every=200 --config.train.checkpoint_every=200

3. 4 mm, no detail maps, 5e-4, from step 2: 2250 steps at about 2 s each (80 minutes; best and
   last: step 2250, validation Dice 0.592 -> 0.625, end-point error 1.175 -> 1.073 voxels), the
   second shipped version (``git show e1a2726:adreg_jax/weights/brain.npz > brain_v2.npz``):

       python train.py --config configs/brain.py --workdir runs/brain \
           --config.train.init_from=runs/brain_6mm --config.data.synth_detail_mm=0 \
           --config.train.learning_rate=5e-4 --config.train.max_steps=2250

   Continued to step 4800 (another 85 minutes): validation Dice 0.636 at best (step 3900) and
   the real brain pairs unchanged (network alone 0.647 / 0.654 / 0.639 against 0.649 / 0.653 /
   0.642), not shipped: more steps of these pairs taught the synthesised anatomy, not two real
   ones. Known fields showed what they lacked: the network found fields of 16-48 mm on the real
   scans (cosine 0.68) but hardly any of 8-16 mm (0.38; ``benchmarks/known_field.py``).
4. Detail maps, T1 only, 3e-4, from step 3: stopped at step 1650 (2.1 s a step, 58 minutes;
   the validation Dice had been flat since step 1050), exported: the best by validation Dice,
   step 1200 (0.668 -> 0.701 on these pairs; end-point error 0.948 -> 0.882 voxels), the third
   shipped version (``git show 751eb3e:adreg_jax/weights/brain.npz > brain_v3.npz``):

       python train.py --config configs/brain.py --workdir runs/brain_detail \
           --config.train.init_from=brain_v2.npz --config.train.max_steps=1650

5. This config (contrasts mixed, NCC on the pairs that share one), from step 4: 900 steps at
   1.24 s a step (21 minutes with validation, 2026-11-28, 2-core AMD EPYC), exported: the best
   by validation Dice, step 600:

       python train.py --config configs/brain.py --workdir runs/brain_mixed \
           --config.train.init_from=brain_v3.npz

   Its 4 validation pairs (small motions: end-point error 0.68 voxels before) hardly tell the
   steps apart (Dice 0.698-0.702 at every step, 0.704 before); on the 16 test pairs the
   exported step raised it, 0.656 -> 0.673 on this config's and 0.646 -> 0.675 on step 4's T1
   pairs (the model card).

From scratch (the next GPU run): the training pairs drawn on the GPU, at learning rate 1e-3, as
many steps as the GPU gives, a share of them on random shapes (pairs of more varied anatomy than
one atlas's are what it needs):

    python train.py --config configs/brain.py --workdir runs/brain_gpu \
        --config.data.synth_on_device=True --config.data.synth_shapes=0.3 \
        --config.train.learning_rate=1e-3 --config.train.max_steps=20000

``data.synth_on_device`` makes each batch in one jitted program on the device that trains on it
(``adreg_jax/data/synth_device.py``), so no host core synthesises pairs. Not yet run on a GPU.
On a machine lent for a limited time, add ``--config.train.max_minutes=M`` (M a few minutes
short of the lease): the run stops with its last step saved, and the same command on the next
machine, given the run directory, goes on from there.
On the 2-core CPU it costs time instead (2026-12-07, 60 steps each, ``--config.train.max_steps=60
--config.train.log_every=20``): steps 20-60 took 2.58 s a step with it against 2.17 s with two
numpy workers beside the step (``data_wait_fraction`` about 0.01 either way: the device's
synthesis is queued ahead of the step, its time inside the step's).
The ablation study (README) trained this config from scratch on one H200 for 1200 steps (five
variants at once, 11.5 minutes): the full model reached the real pairs' Dice of the shipped
version (0.661 / 0.662 / 0.639) and 0.665 on the test pairs (shipped 0.673), data-bound at
2.0-2.5 steps/s: measure the host's pairs/s first (``benchmarks/bench_data.py --config
configs/brain.py --workers ...``) and give one run most of the host's cores
(``--config.data.num_workers``): the five variants' 15 workers made about 11 pairs/s together.
Fine-tuning the shipped weights on device pairs on the CPU (2400 steps, about 2 hours, 2026-12-07)
moved the real pairs no more than its checkpoints differ from each other: what this needs is the
GPU's step count, not more CPU hours. Measured results: the model card
(adreg_jax/weights/brain.md).

Why NCC and the known field, measured earlier on this CPU (6 mm, validation pairs): the label
loss alone left the validation Dice at 0.434 -> 0.435 after 1000 steps (48 x 56 x 48, random
contrasts); with the known-field term added it was still flat after 250 steps, and on one shared
T1 contrast without NCC after 200 (Dice 0.458 -> 0.458); with NCC added it rose within 200 steps
(0.458 -> 0.474).
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
    # the 2 mm MNI grid's extent (96x112x96 voxels) at 4 mm: the network sees scans resampled to
    # about 4 mm (adreg-register resamples to this many voxels and back). The best field on a
    # 6 mm grid cannot reach ANTs SyN's Dice on the real brain pairs, one on a 4 mm grid can
    # (benchmarks/field_resolution.py)
    config.data.image_size = (48, 56, 48)
    config.data.num_workers = 2  # as in the shipped run (any count reads the same batches)
    config.data.val_size = 4
    config.data.test_size = 16
    # half the pairs share one contrast, half the contrasts are the atlas's T1 (see the docstring)
    config.data.synth_same_contrast = 0.5
    config.data.synth_real_contrast = 0.5
    # what the affine stage leaves: the pair's map without an affine part, deformations that vary
    # over 16-48 mm (mean 3-4 mm in the brain; a real pair after the affine stage needs 2.7-3.9)
    config.data.synth_pair_affine = (0.0, 0.0, 0.0)
    config.data.synth_pair_max_mm = 20.0
    config.data.synth_scale_mm = (16.0, 48.0)
    # and inside each of those maps a finer one (up to 8 mm over 8-16 mm): without it the network
    # found next to none of a real scan's known 8-16 mm field (benchmarks/known_field.py)
    config.data.synth_detail_mm = 8.0
    config.data.synth_detail_scale_mm = (8.0, 16.0)

    config.loss.dice_weight = 1.0
    # the known field of each synthesised pair (mean end-point error, voxels): a dense target at
    # every voxel; with the label overlap alone 1000 steps did not move the validation Dice
    config.loss.ddf_weight = 1.0
    # the image term that got the network started; it counts the pairs that share a contrast
    config.loss.ncc_weight = 1.0
    config.loss.ssim_weight = 0.0
    # the mean squared voxel gradient of the DDF against 1 - soft Dice, as SynthMorph's lambda = 1
    # (a smooth field of the synthesised size costs about 1e-3 here, a rough one far more: the
    # Dice gains of registration are about 0.1); folding is watched on the validation pairs
    # (val/folding_percent, < 0.1 % wanted): raise it if the field folds
    config.loss.smooth_weight = 1.0

    config.train.learning_rate = 3e-4  # fine-tuning (stages 4 and 5 above); 1e-3 from scratch
    config.train.steps_per_epoch = 250
    config.train.lr_decay_epochs = 4  # halve the rate every 1000 steps
    config.train.max_steps = 900
    config.train.log_every = 25
    config.train.eval_every = 150
    config.train.checkpoint_every = 150
    config.train.best_metric = "val/dice"
    config.train.early_stopping_patience = 0
    return config
